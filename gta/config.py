"""Where the config tree is, and the typed configs of the parts that take their config whole.

The schema of everything a config builds by ``_target_`` (datasets, networks, methods, EMA, re-weighting,
optimiser, evaluation protocol) is derived from the signatures of those classes in :mod:`gta.schema`, so
each default is written once, in the code. The dataclasses here are the configs whose consumer takes the
typed object itself (the ``Trainer`` takes ``TrainerConfig``), what ``train`` reads key by key (``data``,
``report``), the commands' own options, and the MLflow logger's (its module imports MLflow, which a run
with ``logger=none`` never loads). The ``_target_`` of each node is the class or function it builds: the
Python code never keeps a table of names to classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from gta.tracking.base import EXPERIMENT_NAME

#: The Hydra config tree, inside the package: in a checkout gta/conf links to conf/, a wheel carries a copy.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


# --- logger ----------------------------------------------------------------------------------------
@dataclass
class MLflowConfig:
    _target_: str = "gta.tracking.mlflow.MLflowLogger"
    #: null: $GTA_TRACKING_URI, else mlflow.db in the directory the command runs in (see README)
    tracking_uri: str | None = None
    experiment_name: str = EXPERIMENT_NAME
    #: null: named after the method, dataset, split and seed
    run_name: str | None = None
    #: where metrics that could not be sent are written (null: the run directory)
    fallback_dir: str | None = None
    #: continue this MLflow run (null: a new run, or the run recorded in the checkpoint being resumed)
    run_id: str | None = None
    #: nest the run under this one (null: under the sweep's parent run in a --multirun, else top level)
    parent_run_id: str | None = None
    #: nest the run under the run whose id this JSON file holds (null: a --multirun's mlflow_parent.json)
    parent_file: str | None = None
    #: seconds between the sender thread's attempts while the store does not answer (training never waits)
    retry_interval: float = 5.0
    #: the most seconds one request to a tracking server may take
    request_timeout: float = 10.0
    #: seconds a run waits for its server at the start before it trains without it (and creates its run later)
    start_timeout: float = 3.0


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
class ViewConfig:
    """A view of the unlabeled images besides the weak one (the dataset's crop, rescale and flip): the same
    crop through photometric changes (gta.data.transforms.photometric_view). The defaults are UniMatch's
    strong view."""

    _target_: str = "gta.data.transforms.photometric_view"
    #: colour jitter: brightness, contrast, saturation, hue
    jitter: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5, 0.25])
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    #: the Gaussian blur's standard deviation is drawn uniformly from this range (pixels)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


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
    #: the views of the unlabeled images a method may read besides the weak one, by name; only those the
    #: method names (Method.views) are made
    views: dict[str, ViewConfig] = field(default_factory=lambda: {"strong1": ViewConfig(), "strong2": ViewConfig()})


# --- report --------------------------------------------------------------------------------------
@dataclass
class ReportConfig:
    """Where a run sits in a paper table (tags of its MLflow run) and how ``gta report`` draws the table.

    Experiment files (experiments/<table>.yaml) fill this in; ``row`` and ``column`` are usually
    interpolations of the keys the table sweeps (``${split}``, ``${hydra:runtime.choices.method}``).
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


def register_configs() -> None:
    """Store the schemas where the YAML files' defaults lists find them (``schema_<name>``): every group
    option names its schema in its own file."""
    if not OmegaConf.has_resolver("gta_root"):
        # where data/ lies unless $GTA_DATA says otherwise: the directory the command runs in, as for outputs/
        OmegaConf.register_new_resolver("gta_root", os.getcwd)
    if not OmegaConf.has_resolver("gta_max"):  # conf/launcher/slurm.yaml: one task per GPU, at least one
        OmegaConf.register_new_resolver("gta_max", lambda *values: max(int(v or 0) for v in values))
    # here: the engine reads this module's configs without Hydra, the methods, the networks or the data
    from hydra.core.config_store import ConfigStore

    from gta.schema import SCHEMAS, TrainConfig

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalCommandConfig)
    cs.store(name="predict_schema", node=PredictCommandConfig)
    cs.store(name="export_schema", node=ExportCommandConfig)
    for group, schemas in {**SCHEMAS, "logger": {**SCHEMAS["logger"], "mlflow": MLflowConfig}}.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"schema_{name}", node=node)
