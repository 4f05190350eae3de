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

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gta.errors import DataError

PARENT_FILE = "mlflow_parent.json"
MLFLOW_LOGGER = "gta.tracking.mlflow.MLflowLogger"
#: MLflow's own tag for the source commit (shown in its UI)
GIT_COMMIT_TAG = "mlflow.source.git.commit"


@dataclass(frozen=True)
class SweepParent:
    """What a job needs to nest its run: the store and the parent run in it."""

    tracking_uri: str
    experiment_id: str
    run_id: str

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
            return cls(**json.loads(path.read_text()))
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
    tags = {"overrides": " ".join(overrides), "git_commit": commit}
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


def note_failed_jobs(sweep_dir: Path, summary: str, failures: list[str]) -> None:
    """Say on the sweep's parent run that jobs failed (tag ``failed_jobs``, and the run's description in the
    MLflow UI); it is closed FAILED when the launching process ends."""
    parent = SweepParent.read(sweep_dir)
    if parent is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    client.set_tag(parent.run_id, "failed_jobs", summary)
    client.set_tag(parent.run_id, "mlflow.note.content", "\n\n".join([summary, *failures]))


def parent_for_job(sweep_dir: Path, tracking_uri: str | None) -> str | None:
    """The parent run id a job in ``sweep_dir`` nests under, if its sweep made one in the same store."""
    parent = SweepParent.read(sweep_dir)
    if parent is None:
        return None
    from gta.tracking.mlflow import resolve_tracking_uri

    return parent.run_id if resolve_tracking_uri(tracking_uri) == parent.tracking_uri else None


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
