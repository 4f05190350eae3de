"""The typed schema behind the Hydra config tree.

Every group option's YAML file starts from one of these dataclasses (``defaults: [schema_<name>]``), so
an unknown key or a value of the wrong type fails when the config is composed, naming the key. The
``_target_`` of each node is the class or function it builds: the Python code never keeps a table of
names to classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

#: The Hydra config tree, inside the package: in a checkout gta/conf links to conf/, a wheel carries a copy.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# --- dataset ---------------------------------------------------------------------------------------
@dataclass
class DatasetConfig:
    _target_: str = MISSING
    root: str = MISSING
    num_classes: int = MISSING
    ignore_index: int = 255
    class_names: list[str] | None = None
    palette: list[list[int]] | None = None
    #: input normalisation; the network's pretrained weights set it (model.mean / model.std)
    mean: list[float] = "${model.mean}"  # type: ignore[assignment]
    std: list[float] = "${model.std}"  # type: ignore[assignment]
    crop_size: int = 513
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    #: the class that labels crop padding (null: ignore_index, never a class); the released code uses 0
    pad_label: int | None = None
    #: draw half of the rescale factors below this value and half above (null: uniform over scale_range)
    scale_pivot: float | None = None


@dataclass
class SyntheticConfig(DatasetConfig):
    _target_: str = "gta.data.SyntheticShapes"
    num_labeled_pool: int = 200
    num_unlabeled: int = 300
    num_val: int = 100
    image_size: int = 64
    seed: int = 0
    #: spread of an object's hue around its class's (the class hues lie 0.2 apart): 0.03 keeps the hue
    #: families apart, 0.07 lets their tails overlap
    hue_jitter: float = 0.03


@dataclass
class PascalVOCConfig(DatasetConfig):
    _target_: str = "gta.data.PascalVOC"
    num_classes: int = 21


@dataclass
class PascalVOCAugConfig(PascalVOCConfig):
    _target_: str = "gta.data.PascalVOCAug"


@dataclass
class CityscapesConfig(DatasetConfig):
    _target_: str = "gta.data.Cityscapes"
    num_classes: int = 19
    crop_size: int = 769
    #: "auto" (labelTrainIds files when every image has one), "labelIds" or "labelTrainIds"
    label_files: str = "auto"


@dataclass
class FolderConfig(DatasetConfig):
    _target_: str = "gta.data.SegmentationFolder"
    image_dir: str = "images"
    mask_dir: str = "masks"
    image_suffix: str = ".jpg"
    mask_suffix: str = ".png"
    #: each a sub-folder of image_dir and mask_dir ("." for all of it) or a list file (*.txt) under root
    train: str = "train"
    val: str = "val"
    unlabeled: str | None = None


# --- model -----------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    _target_: str = "gta.models.Segmenter"
    num_classes: int = "${dataset.num_classes}"  # type: ignore[assignment]
    arch: str = "DeepLabV3Plus"
    encoder_name: str = "resnet101"
    #: null (random), a tag smp/timm downloads ("imagenet"), or "package": from an installed package, offline
    encoder_weights: str | None = None
    #: a local file of encoder weights (timm/torchvision names, or lukemelas-style EfficientNet names)
    weights_path: str | None = None
    output_stride: int = 16
    decoder_channels: int = 256
    #: module-name prefixes that form the mask predictor g; every other parameter is the feature extractor f
    mask_predictor: list[str] = field(default_factory=lambda: ["segmentation_head"])
    #: the input normalisation the encoder's weights were trained with (the dataset's by default)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


# --- method ----------------------------------------------------------------------------------------
@dataclass
class SupOnlyConfig:
    _target_: str = "gta.methods.SupOnly"
    ignore_index: int = "${dataset.ignore_index}"  # type: ignore[assignment]


@dataclass
class MeanTeacherConfig(SupOnlyConfig):
    _target_: str = "gta.methods.MeanTeacher"
    ema: Any = "${ema}"
    reweight: Any = "${reweight}"
    #: fraction of the least confident unlabeled pixels dropped per batch
    drop: float = 0.2
    #: μ, the weight of the unsupervised loss
    unsup_weight: float = 1.0
    warmup_epochs: int = 1
    cutmix_prob: float = 0.5


@dataclass
class GTAConfig(MeanTeacherConfig):
    _target_: str = "gta.methods.GTASeg"
    #: what the student receives from the assistant by EMA: "feature_extractor" (the paper) or "all"
    transmit: str = "feature_extractor"
    #: what the assistant and the student learn from (Table 7): "labeled", "pseudo" or "labeled+pseudo"
    assistant_data: str = "pseudo"
    student_data: str = "labeled"


@dataclass
class ReferenceConfig:
    """The released code's behaviours (docs/algorithm.md §5, gta/methods/reference.py); all off: the paper's."""

    _target_: str = "gta.methods.reference.Reference"
    shared_classifier: bool = False
    resync_first_epoch: bool = False
    constant_assistant_lr: bool = False
    mixed_confidence: bool = False
    dropped_in_normaliser: bool = False
    bn_from_forwards: bool = False
    warmup_forwards: bool = False


@dataclass
class GTAReferenceConfig(GTAConfig):
    """GTA-Seg with a switch per behaviour of the released code (variant=gta_reference turns them all on)."""

    _target_: str = "gta.methods.reference.GTASegReference"
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)


@dataclass
class UnbiasedSTConfig(MeanTeacherConfig):
    _target_: str = "gta.methods.UnbiasedST"


# --- ema / reweight / optimizer --------------------------------------------------------------------
@dataclass
class EMAConfig:
    _target_: str = "gta.methods.ema.EMA"
    alpha: float = 0.99
    ramp: bool = True


@dataclass
class UniformReweightConfig:
    _target_: str = "gta.methods.reweight.Uniform"


@dataclass
class ConfidenceReweightConfig:
    _target_: str = "gta.methods.reweight.Confidence"
    tau: float = 1.0


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False


# --- logger ----------------------------------------------------------------------------------------
@dataclass
class NoLoggerConfig:
    _target_: str = "gta.tracking.NullLogger"


@dataclass
class MLflowConfig:
    _target_: str = "gta.tracking.mlflow.MLflowLogger"
    #: null: $GTA_TRACKING_URI, else mlflow.db in the directory the command runs in (see README)
    tracking_uri: str | None = None
    experiment_name: str = "gta"
    #: null: named after the method, dataset, split and seed
    run_name: str | None = None
    #: where metrics that could not be sent are written (null: the run directory)
    fallback_dir: str | None = None
    #: continue this MLflow run (null: a new run, or the run recorded in the checkpoint being resumed)
    run_id: str | None = None
    #: nest the run under this one (null: under the sweep's parent run in a --multirun, else top level)
    parent_run_id: str | None = None
    #: seconds between attempts to send metrics while the store does not answer (each attempt holds training up)
    retry_interval: float = 30.0


# --- engine ----------------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    #: an epoch is one pass over the unlabeled set
    epochs: int = 80
    #: total iterations; overrides ``epochs`` when set
    iters: int | None = None
    #: evaluate every N iterations (0: only at the end)
    eval_every: int = 0
    log_every: int = 20
    #: learning-rate multiplier of everything but the encoder (decoder and classifier)
    decoder_lr_mult: float = 10.0
    #: poly schedule: lr = lr0 * (1 - t/T) ** power
    poly_power: float = 0.9
    #: write <run dir>/checkpoints/last.pt every N iterations (0: only at the end and on stop signals)
    checkpoint_every: int = 500
    #: on a NaN/inf loss: "stop" (fail naming model, loss and iteration; checked without a per-step host sync
    #: at log steps and before evaluations and checkpoints) or "skip" the optimiser step (one sync per update)
    on_nonfinite: str = "stop"
    #: "auto" (a bar on a terminal, else a plain line every log_every iterations), "bar", "lines", "none"
    progress: str = "auto"
    #: pictures logged with each evaluation (gta/engine/snapshots.py): this many validation images and
    #: unlabeled ones, with IoU and confusion charts; 0: none
    snapshot_images: int = 4
    #: data-parallel runs: BatchNorm normalises with the statistics of the global batch (CUDA only)
    sync_bn: bool = False
    #: data-parallel runs: check every N iterations (and at the end) that all ranks hold identical models
    #: (0: never; null: whenever the run evaluates)
    check_sync_every: int | None = None
    #: "fp32", "bf16" or "fp16" (autocast; fp16 also scales the losses): gta/engine/precision.py
    precision: str = "fp32"
    #: models and input batches in the channels_last memory layout
    channels_last: bool = False
    #: torch.compile every model in place (nn.Module.compile: state_dict keys unchanged)
    compile: bool = False
    #: on CUDA, let cuDNN time the convolution algorithms for each new input shape and keep the fastest
    cudnn_benchmark: bool = True


@dataclass
class DataConfig:
    #: labeled images per iteration, and as many unlabeled ones
    batch_size: int = 3
    num_workers: int = 2
    #: batches each worker keeps ready (null: PyTorch's default, 2); needs num_workers > 0
    prefetch_factor: int | None = None
    #: validation images per forward (at most: images of different sizes are never batched together)
    val_batch_size: int = 1
    #: which labeled lists split=NAME names: "paper" (the lists the paper trains on), "cps" (those of
    #: CPS / UniMatch), both shipped in gta/data/splits/; "random": split=N draws N with split_seed
    splits: str = "random"
    split_seed: int = 0
    #: a directory with labeled.txt / unlabeled.txt that fixes the split exactly (data.splits is then unused)
    split_dir: str | None = None
    #: a sample whose files cannot be used (corrupt image, mask of another size, label outside the classes)
    #: when it is loaded: "skip" (warn once per file, record it in <run dir>/bad_samples.jsonl and the
    #: data/bad_samples metric; training draws the next sample, validation leaves it out) or "stop" (fail
    #: naming the file). Skip, so that one bad file among thousands does not end a long run; check a
    #: dataset beforehand with python -m gta check
    on_bad_sample: str = "skip"


@dataclass
class EvalConfig:
    _target_: str = "gta.engine.evaluate.EvalProtocol"
    #: "whole" image, "center_crop" (crop_size) or "sliding" window (crop_size, stride; logits averaged)
    mode: str = "whole"
    crop_size: int = 513
    stride: int = 513
    #: which of the method's models are evaluated during training: "reported" (the teacher for GTA-Seg),
    #: "all" (Table 6) or a list of names; the reported model is always among them
    models: Any = "reported"
    #: center_crop pads smaller images with this label (the dataset's pad_label; null: no padding)
    pad_label: Any = "${dataset.pad_label}"


# --- report --------------------------------------------------------------------------------------
@dataclass
class ReportConfig:
    """Where a run sits in a paper table (tags of its MLflow run) and how ``gta report`` draws the table.

    Experiment files (experiments/<table>.yaml) fill this in; ``row`` and ``column`` are usually
    interpolations of the keys the table sweeps (``${split}``, ``${hydra:runtime.choices.variant}``).
    """

    #: the experiment file the run belongs to, e.g. table4
    table: str | None = None
    title: str | None = None
    row: str | None = None
    column: str | None = None
    #: row / column keys in display order with their printed labels (empty: as found, sorted)
    rows: dict[str, str] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    #: the metric a cell averages over seeds
    metric: str = "val/miou"
    #: one row per metric of each run instead of ``row`` (Table 6: {label: metric key})
    metrics: dict[str, str] = field(default_factory=dict)
    #: the paper's numbers for the table by row key, then column key
    paper: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    #: number of labeled images drawn from the dataset's labeled pool, or "all"
    split: Any = "all"
    model: ModelConfig = MISSING
    method: Any = MISSING
    ema: EMAConfig = MISSING
    reweight: Any = MISSING
    optimizer: SGDConfig = MISSING
    logger: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    seed: int = 0
    #: "auto" (CUDA when available), "cpu" or "cuda"
    device: str = "auto"
    #: checkpoint to continue from; null: <run dir>/checkpoints/last.pt if it exists; "never": start afresh
    resume: str | None = None


@dataclass
class EvalDatasetOverrides:
    root: str | None = None


@dataclass
class EvalProtocolOverrides:
    mode: str | None = None
    crop_size: int | None = None
    stride: int | None = None


@dataclass
class EvalDataOverrides:
    val_batch_size: int | None = None
    num_workers: int | None = None


@dataclass
class SavedModelConfig:
    """A model saved by ``train``, as the commands that load one (eval, predict, export) name it."""

    #: a ``<model>.pt`` state_dict written by ``train``, or a training-state checkpoint with "models"
    checkpoint: str = MISSING
    #: the run's resolved config; null: config.yaml beside the checkpoint or one directory up
    config: str | None = None
    #: which model of a training-state checkpoint to load
    model_name: str = "teacher"


@dataclass
class EvalCommandConfig(SavedModelConfig):
    """``python -m gta eval``: the run's own config, with the values set here (non-null) replacing its own."""

    device: str | None = None
    dataset: EvalDatasetOverrides = field(default_factory=EvalDatasetOverrides)
    eval: EvalProtocolOverrides = field(default_factory=EvalProtocolOverrides)
    data: EvalDataOverrides = field(default_factory=EvalDataOverrides)


@dataclass
class PredictCommandConfig(SavedModelConfig):
    """``python -m gta predict``: segment image files with a saved model (see gta/predict.py)."""

    #: an image file or a directory of them
    input: str = MISSING
    #: where <stem>.png (class ids, palette PNG) and <stem>_overlay.jpg go
    output: str = MISSING
    #: also read the sub-directories of a directory input (mirrored under output)
    recursive: bool = False
    device: str = "auto"
    #: opacity of the coloured prediction in the overlay
    alpha: float = 0.5


@dataclass
class ExportCommandConfig(SavedModelConfig):
    """``python -m gta export``: a saved model as a file for use outside Python (see gta/export.py)."""

    output: str = MISSING
    #: "pt2" (a torch.export program, torch.export.load) or "onnx" (needs the onnx and onnxscript packages)
    format: str = "pt2"


SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {
        "synthetic": SyntheticConfig,
        "pascal_voc": PascalVOCConfig,
        "pascal_voc_aug": PascalVOCAugConfig,
        "cityscapes": CityscapesConfig,
        "folder": FolderConfig,
    },
    "method": {"suponly": SupOnlyConfig, "mean_teacher": MeanTeacherConfig, "gta": GTAConfig,
               "gta_reference": GTAReferenceConfig, "unbiased_st": UnbiasedSTConfig},
    "reweight": {"uniform": UniformReweightConfig, "confidence": ConfidenceReweightConfig},
    "logger": {"none": NoLoggerConfig, "mlflow": MLflowConfig},
}


def register_configs() -> None:
    """Store the schemas where the YAML files' defaults lists find them (``schema_<name>``).

    Groups with a single shape (model, ema, optimizer) are typed by ``TrainConfig`` itself; groups whose
    options differ in shape (dataset, method, reweight, logger) name their schema in each YAML file."""
    if not OmegaConf.has_resolver("gta_root"):
        # where data/ lies unless $GTA_DATA says otherwise: the directory the command runs in, as for outputs/
        OmegaConf.register_new_resolver("gta_root", os.getcwd)
    if not OmegaConf.has_resolver("gta_max"):  # conf/launcher/slurm.yaml: one task per GPU, at least one
        OmegaConf.register_new_resolver("gta_max", lambda *values: max(int(v or 0) for v in values))
    from hydra.core.config_store import ConfigStore  # here: the engine reads the schema without Hydra

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalCommandConfig)
    cs.store(name="predict_schema", node=PredictCommandConfig)
    cs.store(name="export_schema", node=ExportCommandConfig)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"schema_{name}", node=node)
