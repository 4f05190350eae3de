"""Where the config tree is, and the typed configs of the commands: what ``train`` reads key by key
(``report``), the options of eval, predict and export, and the MLflow logger's (its module imports MLflow,
which a run with ``logger=none`` never loads).

The engine's config is :mod:`gta.engine.config`, the data's :mod:`gta.data.config`; the schema of everything
a config builds by ``_target_`` is derived from the signatures of those classes, and the whole tree is
registered for Hydra, in :mod:`gta.schema`. The ``_target_`` of each node is the class or function it
builds: the Python code never keeps a table of names to classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from gta.tracking.base import EXPERIMENT_NAME

#: The Hydra config tree, inside the package: in a checkout gta/conf links to conf/, a wheel carries a copy.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


# --- logger ----------------------------------------------------------------------------------------
@dataclass
class MLflowConfig:
    _target_: str = "gta.tracking.mlflow.MLflowLogger"
    #: null: $GTA_TRACKING_URI, else mlflow.db in the directory the command runs in (see docs/usage.md)
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
    #: seconds before the sender thread tries again after a failure, doubled at each failure in a row up to a
    #: minute (training never waits)
    retry_interval: float = 5.0
    #: the most seconds one request to a tracking server may take
    request_timeout: float = 10.0
    #: seconds a run waits for its server at the start before it trains without it (and creates its run later)
    start_timeout: float = 3.0


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
