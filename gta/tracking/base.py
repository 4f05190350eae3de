"""The logging interface the engine talks to, a no-op implementation, and config flattening.

Nothing here imports MLflow, so a run with ``logger=none`` never pays for (or depends on) it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:
    import numpy as np

#: MLflow rejects longer param values (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``); kept as a
#: literal so that flattening a config does not import MLflow.
MAX_PARAM_VALUE_LENGTH = 6000
#: the experiment a tracked run belongs to unless its config names another (``logger.experiment_name``)
EXPERIMENT_NAME = "gta"


class Logger(ABC):
    """Where a run's params, metrics and files go.

    Implementations must not raise from the logging methods once constructed: a tracking hiccup
    should cost a warning, not a training run.
    """

    run_id: str | None = None
    #: human-readable "where the run is logged", printed in the run summary
    location: str = ""
    #: how to look at the run (a command or a URL), if there is one
    ui_hint: str | None = None

    @abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    @abstractmethod
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a directory (kept under its own name), below ``artifact_path``."""

    @abstractmethod
    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Log an HxWx3 uint8 image as ``artifact_file`` (the extension picks the format)."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    @abstractmethod
    def close(self, status: str = "FINISHED") -> None:
        """End the run as ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``."""


class NullLogger(Logger):
    """Discards everything: for ``logger=none``, tests and quick experiments."""

    location = "nowhere (logger=none)"

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def flatten_config(cfg: DictConfig | Mapping, sep: str = ".") -> dict[str, str]:
    """Flatten a (resolved) config into ``{"a.b.c": "value"}`` strings, the shape MLflow params take.

    Lists stay whole (``"[1, 2]"``) so that one config entry is one param; values are cut to the
    length MLflow accepts rather than making it reject the whole batch. Missing values (``???``)
    are kept as ``"???"``.
    """
    flat: dict[str, str] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, (DictConfig, ListConfig)):
            node = OmegaConf.to_container(node, resolve=True)
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                visit(value, f"{prefix}{sep}{key}" if prefix else str(key))
        else:
            flat[prefix] = str(node)[:MAX_PARAM_VALUE_LENGTH]

    visit(cfg, "")
    flat.pop("", None)  # an empty top-level mapping
    return flat
