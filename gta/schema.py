"""The schema of the config tree, derived from the signatures of the classes it builds.

``schema(Class)`` is hydra-zen's ``builds(Class, populate_full_signature=True)``: a dataclass whose fields are
the constructor's parameters, with their defaults and (where Hydra can check them) their types, so every
default is written once, in the code, and a config run gets what a script calling the class gets. The
schema adds only what the config tree links: interpolations (``${dataset.num_classes}``) and the values a
class fixes for itself (a dataset's number of classes). Every group option's YAML file starts from one of
these (``defaults: [schema_<name>]``), so an unknown key or a value of the wrong type fails when the config
is composed, naming the key.

The typed configs come from the layers that own them (``trainer``: :mod:`gta.engine.config`, ``data``:
:mod:`gta.data.config`, the commands': :mod:`gta.config`). This module imports every class it describes
(torch, the networks, the methods) and registers the tree for Hydra (``register_configs``); only the
commands import it.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Union, get_args, get_origin

import torch
from hydra.core.config_store import ConfigStore
from hydra_zen import BuildsFn
from omegaconf import MISSING, OmegaConf

from gta.config import EvalCommandConfig, ExportCommandConfig, MLflowConfig, PredictCommandConfig, ReportConfig
from gta.contract import IMAGENET_MEAN, IMAGENET_STD
from gta.data import Cityscapes, PascalVOC, PascalVOCAug, SegmentationFolder, SegmentationSource, SyntheticShapes
from gta.data.cityscapes import CITYSCAPES_CLASSES
from gta.data.config import DataConfig
from gta.data.voc import VOC_CLASSES
from gta.engine.config import TrainerConfig
from gta.engine.evaluate import EvalProtocol
from gta.methods import CPS, U2PL, GTASeg, MeanTeacher, STPlusPlus, SupOnly, UnbiasedST, UniMatch
from gta.methods.base import SelfTraining
from gta.methods.ema import EMA
from gta.methods.reference import GTASegReference, Reference
from gta.methods.reweight import Confidence, Uniform
from gta.models import Segmenter
from gta.tracking import NullLogger


class _Builds(BuildsFn):
    """hydra-zen's ``builds``, reading three more annotations as types Hydra checks: ``X | None`` as
    ``Optional[X]``, ``Sequence[X]`` as ``list[X]``, and ``X | Tensor`` as ``X`` (a config holds no tensor);
    a parameter that takes a dataclass (``EMA``) takes the object another node builds, so it is unchecked."""

    @classmethod
    def _sanitized_type(cls, type_: Any, **kwargs: Any) -> Any:
        if is_dataclass(type_):
            return Any
        origin = get_origin(type_)
        if isinstance(type_, types.UnionType) or origin is Union:
            members = tuple(t for t in get_args(type_) if t is not torch.Tensor)
            type_ = members[0] if len(members) == 1 else Union[members]  # noqa: UP007 (Hydra reads typing.Union)
        elif origin is Sequence:
            type_ = list[get_args(type_)]
        return super()._sanitized_type(type_, **kwargs)

    @classmethod
    def _get_obj_path(cls, target: Any) -> str:
        """The shortest import path of ``target``, as a person writes it (``gta.models.Segmenter``)."""
        module, _, name = super()._get_obj_path(target).rpartition(".")
        while "." in module and getattr(sys.modules.get(module.rpartition(".")[0]), name, None) is target:
            module = module.rpartition(".")[0]
        return f"{module}.{name}"


def schema(target: Any, *bases: type, **links: Any) -> type:
    """The schema of ``target``'s constructor: its parameters and defaults, on top of the fields of ``bases``
    (the schema of a base class whose parameters a ``**kwargs`` passes on), with ``links`` set."""
    return _Builds.builds(target, populate_full_signature=True, builds_bases=bases, **links)


# --- dataset: the source's parameters, the network's normalisation unless set ----------------------------
SourceConfig = schema(
    SegmentationSource,
    mean=f"${{oc.select:model.mean,{list(IMAGENET_MEAN)}}}",
    std=f"${{oc.select:model.std,{list(IMAGENET_STD)}}}",
)
SyntheticConfig = schema(SyntheticShapes, SourceConfig, num_classes=SyntheticShapes.num_classes, crop_size="${.image_size}")
PascalVOCConfig = schema(PascalVOC, SourceConfig, num_classes=len(VOC_CLASSES))
PascalVOCAugConfig = schema(PascalVOCAug, PascalVOCConfig)
CityscapesConfig = schema(Cityscapes, SourceConfig, num_classes=len(CITYSCAPES_CLASSES))
FolderConfig = schema(SegmentationFolder, SourceConfig)

# --- model ------------------------------------------------------------------------------------------------
SegmenterConfig = schema(Segmenter, num_classes="${dataset.num_classes}")

# --- method: the network factory is the engine's to give (``model``), the rest links to its groups -------
#: what a method's constructor receives from the other nodes of the tree
METHOD_LINKS = {"ema": "${ema}", "reweight": "${reweight}", "ignore_index": "${dataset.ignore_index}"}
SupOnlyConfig = schema(SupOnly, zen_exclude=("model",), ignore_index=METHOD_LINKS["ignore_index"])
#: a method with SelfTraining's signature names its own ``_target_`` on this schema (docs/extending.md)
SelfTrainingConfig = schema(SelfTraining, zen_exclude=("model",), **METHOD_LINKS)
MeanTeacherConfig = schema(MeanTeacher, zen_exclude=("model",), **METHOD_LINKS)
UnbiasedSTConfig = schema(UnbiasedST, zen_exclude=("model",), **METHOD_LINKS)
GTAConfig = schema(GTASeg, SelfTrainingConfig, zen_exclude=("model", "options"))
GTAReferenceConfig = schema(GTASegReference, GTAConfig, zen_exclude=("args", "kwargs"), reference=schema(Reference))
UniMatchConfig = schema(UniMatch, zen_exclude=("model",), ignore_index=METHOD_LINKS["ignore_index"])
CPSConfig = schema(CPS, zen_exclude=("model",), ignore_index=METHOD_LINKS["ignore_index"])
STPlusPlusConfig = schema(STPlusPlus, zen_exclude=("model",), ignore_index=METHOD_LINKS["ignore_index"])
U2PLConfig = schema(U2PL, zen_exclude=("model",), ema=METHOD_LINKS["ema"], ignore_index=METHOD_LINKS["ignore_index"])

# --- the single-shaped parts of a run ---------------------------------------------------------------------
EMAConfig = schema(EMA)
EvalConfig = schema(EvalProtocol, pad_label="${dataset.pad_label}")
SGDConfig = schema(torch.optim.SGD, zen_partial=True, zen_exclude=("params",))


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    #: number of labeled images drawn from the dataset's labeled pool, or "all"
    split: Any = "all"
    model: Any = MISSING
    method: Any = MISSING
    ema: EMAConfig = field(default_factory=EMAConfig)  # type: ignore[valid-type]
    reweight: Any = MISSING
    optimizer: Any = MISSING
    logger: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # type: ignore[valid-type]
    report: ReportConfig = field(default_factory=ReportConfig)
    seed: int = 0
    #: "auto" (CUDA when available), "cpu" or "cuda"
    device: str = "auto"
    #: checkpoint to continue from; null: <run dir>/checkpoints/last.pt if it exists; "never": start afresh
    resume: str | None = None


#: the schema of each group option, by group and name (``schema_<name>`` in the option's defaults list)
SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {
        "synthetic": SyntheticConfig,
        "pascal_voc": PascalVOCConfig,
        "pascal_voc_aug": PascalVOCAugConfig,
        "cityscapes": CityscapesConfig,
        "folder": FolderConfig,
        # a source whose constructor takes SegmentationSource's parameters names its own _target_ on this
        "source": SourceConfig,
    },
    "model": {"segmenter": SegmenterConfig},
    "method": {"suponly": SupOnlyConfig, "mean_teacher": MeanTeacherConfig, "gta": GTAConfig,
               "gta_reference": GTAReferenceConfig, "unbiased_st": UnbiasedSTConfig,
               "self_training": SelfTrainingConfig, "unimatch": UniMatchConfig, "cps": CPSConfig,
               "st_pp": STPlusPlusConfig,
               "u2pl": U2PLConfig},
    "reweight": {"uniform": schema(Uniform), "confidence": schema(Confidence)},
    "optimizer": {"sgd": SGDConfig},
    "logger": {"none": schema(NullLogger)},
}


def register_configs() -> None:
    """Store the schemas where the YAML files' defaults lists find them (``schema_<name>``): every group
    option names its schema in its own file."""
    if not OmegaConf.has_resolver("gta_root"):
        # where data/ lies unless $GTA_DATA says otherwise: the directory the command runs in, as for outputs/
        OmegaConf.register_new_resolver("gta_root", os.getcwd)
    if not OmegaConf.has_resolver("gta_max"):  # conf/launcher/slurm.yaml: one task per GPU, at least one
        OmegaConf.register_new_resolver("gta_max", lambda *values: max(int(v or 0) for v in values))
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalCommandConfig)
    cs.store(name="predict_schema", node=PredictCommandConfig)
    cs.store(name="export_schema", node=ExportCommandConfig)
    for group, schemas in {**SCHEMAS, "logger": {**SCHEMAS["logger"], "mlflow": MLflowConfig}}.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"schema_{name}", node=node)
