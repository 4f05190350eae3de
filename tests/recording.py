"""A logger that remembers what it was given (in tests: ``logger._target_=recording.Recording``)."""

from __future__ import annotations

from pathlib import Path

from gta.tracking import NullLogger


class Recording(NullLogger):
    #: every instance's records, newest last, so a test can read what a run logged
    runs: list[Recording] = []

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        Recording.runs.append(self)

    def log_params(self, params) -> None:
        self.params.update(params)

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))
