"""Semi-supervised methods: each module holds one algorithm and nothing else."""

from gta.methods.base import Batch, Method, Progress, Update
from gta.methods.gta import GTASeg
from gta.methods.mean_teacher import MeanTeacher
from gta.methods.suponly import SupOnly
from gta.methods.unbiased_st import UnbiasedST

__all__ = ["Batch", "GTASeg", "MeanTeacher", "Method", "Progress", "SupOnly", "UnbiasedST", "Update"]
