"""Semi-supervised methods: each module holds one algorithm and nothing else (the contract they fulfil is
``gta.contract``)."""

from gta.methods.cps import CPS
from gta.methods.gta import GTASeg
from gta.methods.mean_teacher import MeanTeacher
from gta.methods.st_pp import STPlusPlus
from gta.methods.suponly import SupOnly
from gta.methods.u2pl import U2PL
from gta.methods.unbiased_st import UnbiasedST
from gta.methods.unimatch import UniMatch

__all__ = ["CPS", "GTASeg", "MeanTeacher", "STPlusPlus", "SupOnly", "U2PL", "UnbiasedST", "UniMatch"]
