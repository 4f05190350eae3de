"""MLflow backend of :class:`gta.tracking.Logger`.

It talks to the store through an explicit :class:`mlflow.MlflowClient` rather than MLflow's fluent
API, so no process-global "active run" exists: several loggers can coexist in one process (sweeps,
tests) and nothing leaks between them.

Start-up problems (unreachable server, unwritable store) fail loudly at construction, before any
training time is spent. Once the run exists, tracking problems only warn: what cannot be sent (metric
values, params, tags, files, pictures, the run's end) waits in memory, in order, and is retried; what is
still unsent when the run ends is written to ``unsent_tracking.jsonl`` in the run directory. A resumed run
sends that file first; ``python -m gta sync`` sends it for a run that is over (:func:`replay_unsent`).
"""

from __future__ import annotations

import json
import os
import shlex
import time
import warnings
from collections.abc import Mapping
from itertools import takewhile
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
#: what a run could not send to its store (metric values, params, tags, files, its end), for a later try
UNSENT_FILE = "unsent_tracking.jsonl"
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


def chunks(values: dict[str, str]) -> list[dict[str, str]]:
    """``values`` in pieces of as many as one MLflow request takes."""
    items = list(values.items())
    return [dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH]) for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH)]


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
        self._pending: list[dict] = []  # records for send(), in order
        self._logged: dict[str, int] = {}
        self._failing = False  # a send failed and has not succeeded since: warn once per outage
        self._next_attempt = 0.0
        self._closed = False

        extra_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            extra_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if run_id:
            unsent = self.fallback_dir / UNSENT_FILE
            if unsent.is_file():
                try:
                    replay_unsent(unsent)
                except UnreachableServerError as e:
                    self._warn(f"could not send {unsent} (kept)", e)
            run = self._client.get_run(run_id)
            self._client.update_run(run_id, "RUNNING")
            # the last step of each metric already there: a step logged after the checkpoint this run resumes
            # from is trained again, and is not logged twice
            self._logged = {key: max(m.step for m in self._client.get_metric_history(run_id, key))
                            for key in run.data.metrics}
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

    # --- sending: one buffer of records, sent in order -------------------------------------------
    def _queue(self, *records: dict) -> None:
        """Buffer records and send the buffer, unless a failed send is waiting out ``retry_interval``."""
        self._pending.extend(records)
        if time.monotonic() >= self._next_attempt:
            self._send_pending()

    def _send_pending(self, warn: bool = True) -> BaseException | None:
        """Send the buffer (:func:`send`); returns the error that stopped it, if any. Warns once per outage, not
        at every retry."""
        try:
            if _is_http(self.tracking_uri):
                # Probe cheaply first: a real request to a dead server blocks for minutes of MLflow retries.
                check_reachable(self.tracking_uri, self.connect_timeout)
            send(self._client, self.run_id, self._pending)
        except Exception as e:
            self._next_attempt = time.monotonic() + self.retry_interval
            if warn and not self._failing:
                self._warn(f"could not log {len(self._pending)} records", e, "; keeping them in memory and retrying")
            self._failing = True
            return e
        self._failing = False
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._queue(*({"key": key, "value": float(value), "step": int(step), "timestamp": now}
                      for key, value in metrics.items() if self._logged.get(key, -1) < step))

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
        self._params.update(new)
        self._queue(*({"params": chunk} for chunk in chunks(new)))
        if changed:
            self.set_tags(changed)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._queue(*({"tags": chunk} for chunk in chunks({k: str(v) for k, v in tags.items()})))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._queue({"artifact": str(Path(path).absolute()), "artifact_path": artifact_path})

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Written to ``artifact_file`` under the fallback directory (the run directory) first: there on disk,
        and sent from there, now or later."""
        from PIL import Image

        path = self.fallback_dir / artifact_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
        except OSError as e:
            self._warn(f"could not write image {path}", e)
            return
        self._queue({"artifact": str(path), "artifact_path": str(Path(artifact_file).parent) or None})

    # --- end -------------------------------------------------------------------------------------
    def close(self, status: str = "FINISHED") -> None:
        """Send what is still buffered and end the run; what cannot be sent, the end included, is written to
        the fallback file for :func:`replay_unsent`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending.append({"status": status})
        if (error := self._send_pending(warn=False)) is None:
            return
        what = f"{len(self._pending) - 1} records and the run's end ({status})"
        try:
            path = self.fallback_dir / UNSENT_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            where = {"tracking_uri": self.tracking_uri, "run_id": self.run_id}
            with path.open("a") as f:
                f.writelines(json.dumps({**where, **record}) + "\n" for record in self._pending)
            where = f"written to {path}; `python -m gta sync {path.parent}` sends them"
        except OSError as e:
            where = f"LOST (could not write them to {self.fallback_dir}: {e})"
        self._warn(f"{what} could not be sent", error, f"; {where}")


def send(client: MlflowClient, run_id: str, records: list[dict]) -> None:
    """Store ``records`` in run ``run_id`` in order: metric values (key, value, step, timestamp; in MLflow-sized
    batches), params, tags, files (artifact, artifact_path) and the run's end (status). Each leaves the list
    once stored, so that what an error stops is still there."""
    while records:
        first = records[0]
        count = 1
        if "key" in first:
            batch = list(takewhile(lambda r: "key" in r, records[:MAX_METRICS_PER_BATCH]))
            metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in batch]
            client.log_batch(run_id, metrics=metrics, synchronous=True)
            count = len(batch)
        elif "params" in first:
            client.log_batch(run_id, params=[Param(k, v) for k, v in first["params"].items()], synchronous=True)
        elif "tags" in first:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in first["tags"].items()], synchronous=True)
        elif "artifact" in first:
            client.log_artifact(run_id, first["artifact"], first["artifact_path"])
        else:
            client.set_terminated(run_id, first["status"])
        del records[:count]


def replay_unsent(path: Path) -> dict[str, int]:
    """Send what a fallback file kept to the runs it names (:func:`send`) and remove the file. Returns the
    number of records sent per run. A store that still cannot be reached raises
    :class:`UnreachableServerError` naming it; the file then keeps what was not sent."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            runs.setdefault((record.pop("tracking_uri"), record.pop("run_id")), []).append(record)
    sent: dict[str, int] = {}
    for (uri, run_id), records in runs.items():
        count = len(records)
        try:
            if _is_http(uri):
                check_reachable(uri)
            send(MlflowClient(uri), run_id, records)
        except Exception as e:
            left = [{"tracking_uri": u, "run_id": i, **r} for (u, i), kept in runs.items() for r in kept]
            path.write_text("".join(json.dumps(r) + "\n" for r in left))
            raise UnreachableServerError(
                f"could not send {path} to run {run_id} at {uri} ({_describe(e)}); the {len(left)} records not "
                "sent are kept there"
            ) from e
        sent[run_id] = count
    path.unlink()
    return sent
