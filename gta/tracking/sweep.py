"""MLflow for sweeps: one parent run per ``--multirun`` sweep, every job's run nested under it.

The parent is made by a Hydra callback of the train command (``gta.train.SweepParentRun``) in the launching
process, before any job starts: the store (a fresh sqlite file is not safe to create from many processes at
once), the experiment and the parent run all exist by the time the first job opens the store. The callback
writes the parent's id to ``<sweep dir>/mlflow_parent.json``; each job (in this process, a local subprocess or
a SLURM node that shares the file system) reads it there and creates its run with the parent's id. Re-running
a sweep into the same directory re-opens the same parent, so resumed jobs land beside the finished ones.

Nothing here imports MLflow at module level: the callback is built for every run, also with
``logger=none``.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gta.errors import DataError

PARENT_FILE = "mlflow_parent.json"
MLFLOW_LOGGER = "gta.tracking.mlflow.MLflowLogger"
#: MLflow's own tags for the source commit, the source, its type and the user (shown in its UI)
GIT_COMMIT_TAG = "mlflow.source.git.commit"
SOURCE_NAME, SOURCE_TYPE, USER = "mlflow.source.name", "mlflow.source.type", "mlflow.user"


@dataclass(frozen=True)
class SweepParent:
    """What a job needs to nest its run: the store and the parent run in it (None until the store has answered
    the sweep's start: the parent's logger writes them in then, see ``MLflowLogger(publish=...)``)."""

    tracking_uri: str
    experiment_id: str | None
    run_id: str | None
    #: the keys the sweep's grid varies (``grid_keys``), which name its jobs' runs
    grid: tuple[str, ...] = ()

    def write(self, sweep_dir: Path) -> Path:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        path = sweep_dir / PARENT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)  # jobs never see a half-written file
        return path

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepParent | None:
        path = Path(sweep_dir) / PARENT_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            return cls(**record | {"grid": tuple(record.get("grid", ()))})
        except (TypeError, ValueError) as e:
            raise DataError(f"{path} is not a sweep's MLflow parent record ({e}); delete it to start anew") \
                from e


#: the checkout whose commit a sweep records: the directory above the package, when that is a git work tree
CHECKOUT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = CHECKOUT) -> str:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git, and
    for an installed package (whose site-packages may lie inside some other repository: not gta's commit)."""
    try:
        run = lambda *args: subprocess.run(  # noqa: E731
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        if Path(run("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return "unknown"
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def uses_mlflow(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "logger._target_") == MLFLOW_LOGGER


def sweep_tags(cfg: DictConfig, overrides: list[str], experiment: str | None = None) -> dict[str, str]:
    """What a sweep's parent and its jobs share: experiment file, table, overrides and commit."""
    commit = git_commit()
    tags = {"overrides": " ".join(overrides), "git_commit": commit, SOURCE_NAME: "gta train",
            # the UI's Source and User columns
            SOURCE_TYPE: "JOB" if "SLURM_JOB_ID" in os.environ else "LOCAL", USER: getpass.getuser()}
    tags[GIT_COMMIT_TAG] = commit.removesuffix("-dirty")
    if experiment:
        tags["experiment"] = experiment
    table = OmegaConf.select(cfg, "report.table")
    if table is not None:
        tags["table"] = str(table)
    return tags


def run_tags(cfg: DictConfig, overrides: list[str], experiment: str | None = None) -> dict[str, str]:
    """The tags every run carries: those of :func:`sweep_tags`, its seed, and its row and column in the
    table (``report.row`` / ``report.column``, resolved for this run)."""
    tags = sweep_tags(cfg, overrides, experiment) | {"seed": str(cfg.seed)}
    for key in ("row", "column"):
        value = OmegaConf.select(cfg, f"report.{key}")
        if value is not None:
            tags[key] = str(value)
    return tags


def grid_keys(config: DictConfig) -> list[str]:
    """The keys a ``--multirun`` varies, in the sweeper's order: the grid of the experiment file
    (``hydra.sweeper.params``) with the command line's sweeps (``a,b``, ``range(...)``), where a plain
    command-line value narrows the file's grid to one point."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    given = [f"{key}={value}" for key, value in params.items()]
    given += OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    sweeps: dict[str, bool] = {}
    for override in OverridesParser.create().parse_overrides(given):
        sweeps[override.key_or_group] = override.is_sweep_override()
    return [key for key, varies in sweeps.items() if varies]


def grid_point(overrides: list[str], keys: list[str]) -> str:
    """``key=value`` of each of ``keys`` in one job's overrides: what tells this job from the others."""
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return " ".join(f"{key}={values[key]}" for key in keys if key in values)


def note_failed_jobs(sweep_dir: Path, summary: str, failures: list[str]) -> None:
    """Say on the sweep's parent run that jobs failed (tag ``failed_jobs``, and the run's description in the
    MLflow UI); it is closed FAILED when the launching process ends."""
    parent = SweepParent.read(sweep_dir)
    if parent is None or parent.run_id is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    try:
        client.set_tag(parent.run_id, "failed_jobs", summary)
        client.set_tag(parent.run_id, "mlflow.note.content", "\n\n".join([summary, *failures]))
    except Exception as e:  # the server away: the sweep's own message says which jobs failed
        warnings.warn(f"could not mark the sweep's parent run {parent.run_id} at {parent.tracking_uri}: {e}",
                      RuntimeWarning, stacklevel=2)


def sweep_dir_of_job() -> Path | None:
    """The sweep directory when this process runs a job of a ``--multirun`` sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(os.path.abspath(str(hydra_cfg.sweep.dir)))
