"""MLflow backend of :class:`gta.tracking.Logger`.

It talks to the store through an explicit :class:`mlflow.MlflowClient` rather than MLflow's fluent
API, so no process-global "active run" exists: several loggers can coexist in one process (sweeps,
tests) and nothing leaks between them.

Start-up problems (unreachable server, unwritable store) fail loudly at construction, before any
training time is spent. Once the run exists, tracking problems only warn: metrics that cannot be
sent are kept in memory, retried, and written to ``unsent_metrics.jsonl`` if the run ends before the
store comes back.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.file_utils import path_to_local_sqlite_uri
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.rest_utils import http_request
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from gta.errors import ConfigError, UnreachableServerError, UnwritablePathError
from gta.tracking.base import EXPERIMENT_NAME, Logger

if TYPE_CHECKING:
    import numpy as np

_SQLITE_PREFIX = "sqlite:///"
#: tag prefix under which a param that changed value on resume is recorded (params are immutable)
CHANGED_PARAM_TAG_PREFIX = "changed_param."
UNSENT_METRICS_FILE = "unsent_metrics.jsonl"
#: MLflow's experiment tag that tells its UI what the experiment holds
EXPERIMENT_KIND = "mlflow.experimentKind"


def default_tracking_uri() -> str:
    """``mlflow.db`` in the directory the command runs in (as Hydra's outputs/), made absolute so that a later
    ``chdir`` cannot move it."""
    return path_to_local_sqlite_uri(Path.cwd() / "mlflow.db")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other stores and in-memory sqlite."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    path = unquote(uri[len(_SQLITE_PREFIX) :].split("?", 1)[0])
    return None if path in ("", ":memory:") else Path(path).absolute()


def _absolute_sqlite_uri(uri: str) -> str:
    """Pin a relative sqlite URI to the current directory now, so later ``chdir``s cannot move the store."""
    path = sqlite_path(uri)
    if path is None:
        return uri
    query = uri.partition("?")[2]
    return path_to_local_sqlite_uri(path) + (f"?{query}" if query else "")


def resolve_tracking_uri(uri: str | None) -> str:
    """The store a logger given ``uri`` writes to: the default store for None, sqlite paths made absolute."""
    return _absolute_sqlite_uri(uri or default_tracking_uri())


def _prepare_sqlite(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnwritablePathError(f"cannot create the directory of the MLflow store {path}: {e}") from e
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UnwritablePathError(
            f"the MLflow store {path} is not writable; point logger.tracking_uri=sqlite:////other/mlflow.db "
            "elsewhere or run with logger=none"
        )


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast if nothing answers at ``uri``.

    MLflow itself retries a dead server with backoff for about four minutes per request; one
    unretried request with a short timeout tells the same thing in seconds. Any HTTP answer counts.
    """
    try:
        creds = get_default_host_creds(uri)
        http_request(creds, "/health", "GET", max_retries=0, timeout=timeout, raise_on_status=False)
    except Exception as e:
        raise UnreachableServerError(
            f"cannot reach the MLflow tracking server at {uri} ({e}). Start it, point "
            "logger.tracking_uri=... (or GTA_TRACKING_URI) at a reachable one, or run with logger=none."
        ) from e


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:500] + "..."


class MLflowLogger(Logger):
    """Logs one MLflow run, created here or resumed from ``run_id`` (then the run keeps its own
    experiment and name; ``experiment_name`` and ``run_name`` are ignored).

    ``fallback_dir``: where ``unsent_metrics.jsonl`` goes if metrics still cannot be sent when the
    run closes (default: the current directory). ``retry_interval``: seconds to wait after a failed
    send before trying again, since every attempt against a struggling store blocks training.
    ``connect_timeout``: seconds the start-up reachability check of an http(s) server may take.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = EXPERIMENT_NAME,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
        fallback_dir: str | Path | None = None,
        retry_interval: float = 30.0,
        connect_timeout: float = 3.0,
    ):
        uri = resolve_tracking_uri(tracking_uri)
        db = sqlite_path(uri)
        if db is not None:
            _prepare_sqlite(db)
        elif _is_http(uri):
            check_reachable(uri, connect_timeout)
        self.tracking_uri = uri
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path.cwd()
        self.retry_interval = retry_interval
        self.connect_timeout = connect_timeout
        self._client = MlflowClient(uri)
        self._pending: list[Metric] = []
        self._failing = False  # a send failed and has not succeeded since: warn once per outage
        self._next_attempt = 0.0
        self._closed = False

        extra_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            extra_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if run_id:
            run = self._client.get_run(run_id)
            self._client.update_run(run_id, "RUNNING")
            if extra_tags:
                tag_list = [RunTag(k, v) for k, v in extra_tags.items()]
                self._client.log_batch(run_id, tags=tag_list, synchronous=True)
        else:
            if artifact_location is None and db is not None:
                # MLflow would otherwise put artifacts in ./mlruns of whatever directory the run started in.
                artifact_location = (db.parent / "mlartifacts").as_uri()
            experiment_id = self._experiment_id(experiment_name, artifact_location)
            run = self._client.create_run(experiment_id, run_name=run_name, tags=extra_tags)
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.experiment_name: str = self._client.get_experiment(self.experiment_id).name
        self.location = f"MLflow run {self.run_id} in experiment '{self.experiment_name}' at {uri}"
        # Params already in the run (on resume): MLflow refuses to change them, see log_params.
        self._params: dict[str, str] = dict(run.data.params)

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                # the UI opens such an experiment on its runs, not on the GenAI traces page
                return self._client.create_experiment(name, artifact_location=artifact_location,
                                                      tags={EXPERIMENT_KIND: "custom_model_development"})
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Another run of the same sweep created it in the meantime.
                experiment = self._client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment '{name}' at {self.tracking_uri} is deleted: restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                "or choose another logger.experiment_name"
            )
        return experiment.experiment_id

    @property
    def ui_hint(self) -> str | None:
        if sqlite_path(self.tracking_uri) is not None:
            return f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)} --host 127.0.0.1"
        if _is_http(self.tracking_uri):
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return None

    def _warn(self, what: str, error: BaseException, then: str = "") -> None:
        warnings.warn(
            f"MLflow at {self.tracking_uri}: {what}: {_describe(error)}{then}", RuntimeWarning, stacklevel=3
        )

    # --- metrics ---------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, int(step)) for key, value in metrics.items())
        if time.monotonic() >= self._next_attempt:
            self._send_pending()

    def _send_pending(self, warn: bool = True) -> BaseException | None:
        """Send buffered metrics in MLflow-sized batches; a batch leaves the buffer once it is stored.

        Returns the error that stopped it, if any. Warns once per outage, not at every retry.
        """
        try:
            if _is_http(self.tracking_uri):
                # Probe cheaply first: a real request to a dead server blocks for minutes of MLflow retries.
                check_reachable(self.tracking_uri, self.connect_timeout)
            while self._pending:
                batch = self._pending[:MAX_METRICS_PER_BATCH]
                self._client.log_batch(self.run_id, metrics=batch, synchronous=True)
                del self._pending[: len(batch)]
        except Exception as e:
            self._next_attempt = time.monotonic() + self.retry_interval
            if warn and not self._failing:
                self._warn(
                    f"could not log {len(self._pending)} metric values", e,
                    "; keeping them in memory and retrying",
                )
            self._failing = True
            return e
        self._failing = False
        return None

    def _write_unsent(self) -> Path:
        """Append the buffered metrics as JSON lines (run_id, key, value, step, timestamp) to replay later."""
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        path = self.fallback_dir / UNSENT_METRICS_FILE
        with path.open("a") as f:
            for m in self._pending:
                record = {"run_id": self.run_id, "key": m.key, "value": m.value, "step": m.step,
                          "timestamp": m.timestamp}
                f.write(json.dumps(record) + "\n")
        return path

    # --- params, tags, files ---------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; re-logging a param with its current value is a no-op.

        MLflow params are immutable, so a param whose value differs from the one already in the run
        (a resumed run with a changed config) is recorded as the tag ``changed_param.<key>`` instead.
        """
        new: dict[str, str] = {}
        changed: dict[str, str] = {}
        for key, value in params.items():
            value = str(value)[:MAX_PARAM_VAL_LENGTH]
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                changed[CHANGED_PARAM_TAG_PREFIX + key] = value
        unsent = list(new.items())
        try:
            while unsent:
                batch = unsent[:MAX_PARAMS_TAGS_PER_BATCH]
                self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in batch], synchronous=True)
                self._params.update(batch)
                del unsent[: len(batch)]
        except Exception as e:
            self._warn(f"could not log {len(unsent)} params", e)
        if changed:
            self.set_tags(changed)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        try:
            for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=items[start : start + MAX_PARAMS_TAGS_PER_BATCH],
                                       synchronous=True)
        except Exception as e:
            self._warn(f"could not set tags {list(tags)}", e)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as e:
            self._warn(f"could not log artifact {path}", e)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        try:
            self._client.log_image(self.run_id, image, artifact_file)
        except Exception as e:
            self._warn(f"could not log image {artifact_file}", e)

    # --- end -------------------------------------------------------------------------------------
    def close(self, status: str = "FINISHED") -> None:
        """Send what is still buffered (else write it to the fallback file) and end the run; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pending and (error := self._send_pending(warn=False)) is not None:
            try:
                where = f"written to {self._write_unsent()}"
            except OSError as e:
                where = f"LOST (could not write them to {self.fallback_dir}: {e})"
            self._warn(f"{len(self._pending)} metric values could not be sent", error, f"; {where}")
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as e:
            self._warn(f"could not mark run {self.run_id} {status}", e)
