"""MLflow backend of :class:`gta.tracking.Logger`.

The training thread never waits on the tracking store. Each logging call appends records (metric values, params,
tags, files, pictures, the run's end) to one ordered buffer, and the logger's sender thread sends that buffer
through an explicit :class:`mlflow.MlflowClient` (no process-global "active run": several loggers coexist in one
process). A request to an http(s) server is tried once and waits at most ``request_timeout`` seconds; the sender
retries on its own, waiting longer after each failure in a row, and warns once per outage.

The run itself is created (or, on resume, reopened) by the sender too, once the store answers: a job that starts
while its server is away trains all the same. What is still unsent when the run ends, its creation included, is
written to ``unsent_tracking.jsonl`` in the run directory. A run started again in that directory takes the file
over (it is the same run); ``python -m gta sync`` sends it for a run that is over (:func:`replay_unsent`).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.file_utils import path_to_local_sqlite_uri
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from gta.errors import ConfigError, UnreachableServerError, UnwritablePathError
from gta.tracking.base import EXPERIMENT_NAME, Logger

if TYPE_CHECKING:
    import numpy as np

_SQLITE_PREFIX = "sqlite:///"
#: tag prefix under which a param that changed value on resume is recorded (params are immutable)
CHANGED_PARAM_TAG_PREFIX = "changed_param."
#: what a run could not send to its store (its creation, metric values, params, tags, files, its end)
UNSENT_FILE = "unsent_tracking.jsonl"
#: MLflow's experiment tag that tells its UI what the experiment holds
EXPERIMENT_KIND = "mlflow.experimentKind"
#: the tag that names a run before the store has given it an id: a creation that timed out but reached the store is
#: found by it rather than made twice
RUN_KEY_TAG = "gta.run_key"
#: the longest wait between two attempts while the store keeps failing (each failure doubles the wait)
MAX_RETRY_INTERVAL = 60.0
#: MLflow's own settings for its http requests, which it otherwise retries with backoff for minutes
REQUEST_TIMEOUT, REQUEST_RETRIES = "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


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


def bound_requests(timeout: float) -> None:
    """Each MLflow http request of this process tried once, for at most ``timeout`` seconds (unless the environment
    already sets MLflow's own variables): the logger retries by itself, without holding anything up."""
    os.environ.setdefault(REQUEST_TIMEOUT, str(max(1, round(timeout))))
    os.environ.setdefault(REQUEST_RETRIES, "0")


def chunks(values: dict[str, str]) -> list[dict[str, str]]:
    """``values`` in pieces of as many as one MLflow request takes."""
    items = list(values.items())
    return [dict(items[i : i + MAX_PARAMS_TAGS_PER_BATCH]) for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH)]


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:500] + "..."


def read_parent(path: str | None, uri: str) -> str | None:
    """The run id in a parent file (a sweep's ``mlflow_parent.json``) when it names a run in the store ``uri``."""
    if path is None or not Path(path).is_file():
        return None
    try:
        record = json.loads(Path(path).read_text())
    except ValueError:  # being replaced
        return None
    return record.get("run_id") if record.get("tracking_uri") == uri else None


class TrackedRun:
    """One MLflow run as records are sent to it: created from ``create`` (experiment_name, run_name, tags,
    artifact_location, parent_file, publish) or reopened (``run_id``) once the store answers, by :meth:`open`."""

    def __init__(self, client: MlflowClient, uri: str, run_id: str | None, create: dict | None = None) -> None:
        self.client, self.uri, self.run_id, self.create = client, uri, run_id, create
        self.experiment_id: str | None = None
        self.experiment_name: str | None = create["experiment_name"] if create else None
        self.opened = False
        self.logged: dict[str, int] = {}  # the last step of each metric in the store
        self.params: dict[str, str] = {}  # params in the store (immutable there)
        #: a parent file whose run did not exist yet when this run was created: its id is a tag to set later
        self.parent_file: str | None = None

    def open(self, running: bool = True) -> None:
        """Create the run, or reopen it (``running``: mark it RUNNING again, as a resumed run is)."""
        if self.run_id is None:
            spec = self.create
            experiment_id = self._experiment_id(spec["experiment_name"], spec.get("artifact_location"))
            tags = dict(spec.get("tags") or {})
            parent = read_parent(spec.get("parent_file"), self.uri)
            if parent:
                tags[MLFLOW_PARENT_RUN_ID] = parent
            elif spec.get("parent_file") and MLFLOW_PARENT_RUN_ID not in tags:
                self.parent_file = spec["parent_file"]
            made = self.client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{tags[RUN_KEY_TAG]}'")
            run = made[0] if made else self.client.create_run(experiment_id, run_name=spec.get("run_name"), tags=tags)
            self.run_id = run.info.run_id
        else:
            run = self.client.get_run(self.run_id)
            if running:
                self.client.update_run(self.run_id, "RUNNING")
            # a step logged after the checkpoint a run resumes from is trained again, and is not logged twice
            self.logged = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                           for key in run.data.metrics}
        self.experiment_id = run.info.experiment_id
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        self.params = dict(run.data.params)
        self.opened = True
        if self.create and self.create.get("publish"):
            self._publish(Path(self.create["publish"]))

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                # the UI opens such an experiment on its runs, not on the GenAI traces page
                return self.client.create_experiment(name, artifact_location=artifact_location,
                                                     tags={EXPERIMENT_KIND: "custom_model_development"})
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Another run of the same sweep created it in the meantime.
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment '{name}' at {self.uri} is deleted: restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                "or choose another logger.experiment_name"
            )
        return experiment.experiment_id

    def _publish(self, path: Path) -> None:
        """Write this run's ids into ``path`` (other keys kept), for the runs that name it as their parent file."""
        record = json.loads(path.read_text()) if path.is_file() else {}
        record |= {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)  # readers never see a half-written file

    def send(self, records: list[dict]) -> None:
        """Store ``records`` in order: metric values (in MLflow-sized batches, each step of a metric once), params
        (a changed value becomes the tag ``changed_param.<key>``), tags, files, the run's end. Each leaves the list
        once stored, so that what an error stops is still there."""
        self._find_parent()
        while records:
            first, count = records[0], 1
            if "key" in first:
                batch = list(takewhile(lambda r: "key" in r, records[:MAX_METRICS_PER_BATCH]))
                new = [r for r in batch if r["step"] > self.logged.get(r["key"], -1)]
                if new:
                    metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in new]
                    self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                for r in new:
                    self.logged[r["key"]] = max(r["step"], self.logged.get(r["key"], -1))
                count = len(batch)
            elif "params" in first:
                self._log_params(first["params"])
            elif "tags" in first:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in first["tags"].items()],
                                      synchronous=True)
            elif "artifact" in first:
                if Path(first["artifact"]).exists():
                    self.client.log_artifact(self.run_id, first["artifact"], first["artifact_path"])
                else:
                    warnings.warn(f"MLflow: {first['artifact']} is gone: not logged", RuntimeWarning, stacklevel=2)
            elif "parent_file" in first:
                self.parent_file = first["parent_file"]
                self._find_parent()
            elif "status" in first:
                self.client.set_terminated(self.run_id, first["status"])
            del records[:count]

    def _find_parent(self) -> None:
        if self.parent_file and (parent := read_parent(self.parent_file, self.uri)):
            self.client.set_tag(self.run_id, MLFLOW_PARENT_RUN_ID, parent)
            self.parent_file = None

    def _log_params(self, params: dict[str, str]) -> None:
        new = {k: v for k, v in params.items() if k not in self.params}
        changed = {CHANGED_PARAM_TAG_PREFIX + k: v for k, v in params.items() if self.params.get(k, v) != v}
        if new:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()], synchronous=True)
            self.params |= new
        if changed:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in changed.items()], synchronous=True)

    def unsent(self, records: list[dict]) -> list[dict]:
        """What a file must keep for ``records`` to reach this run later: its creation first if it was never
        created, the parent still to find, then the records."""
        head = []
        if self.run_id is None:
            head.append({"create": self.create})
        if self.parent_file:
            head.append({"parent_file": self.parent_file})
        where = {"tracking_uri": self.uri, "run_id": self.run_id}
        return [{**where, **record} for record in head + records]


def read_unsent(path: Path) -> dict[tuple[str, str | None], list[dict]]:
    """A fallback file's records by the (store, run) they belong to, in order."""
    runs: dict[tuple[str, str | None], list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            runs.setdefault((record.pop("tracking_uri"), record.pop("run_id")), []).append(record)
    return runs


def _runs_of(uri: str, run_id: str | None, records: list[dict], client: MlflowClient | None = None) -> TrackedRun:
    """The run a file's records go to; a run never created carries its creation in its first record."""
    create = records.pop(0)["create"] if records and "create" in records[0] else None
    return TrackedRun(client or MlflowClient(uri), uri, run_id, create)


class MLflowLogger(Logger):
    """Logs one MLflow run, created here or continued from ``run_id`` (then the run keeps its own experiment and
    name; ``experiment_name`` and ``run_name`` are ignored).

    ``parent_run_id``: nest the run under this one; ``parent_file``: under the run whose id a JSON file holds (a
    sweep's ``mlflow_parent.json``), read when the run is created and, if it holds none yet, until it does.
    ``publish``: a JSON file into which this run's ids are written once it exists. ``fallback_dir``: where
    ``unsent_tracking.jsonl`` goes (default: the current directory). ``retry_interval``: seconds before the
    sender tries again after a failed attempt, doubled at each failure in a row up to a minute.
    ``request_timeout``: the most one http request may take.
    ``start_timeout``: how long the constructor waits for the store to answer before training goes on without it.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = EXPERIMENT_NAME,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        parent_file: str | None = None,
        publish: str | None = None,
        artifact_location: str | None = None,
        fallback_dir: str | Path | None = None,
        retry_interval: float = 5.0,
        request_timeout: float = 10.0,
        start_timeout: float = 3.0,
    ):
        uri = resolve_tracking_uri(tracking_uri)
        db = sqlite_path(uri)
        if db is not None:
            _prepare_sqlite(db)
            if artifact_location is None:
                # MLflow would otherwise put artifacts in ./mlruns of whatever directory the run started in.
                artifact_location = (db.parent / "mlartifacts").as_uri()
        elif _is_http(uri):
            bound_requests(request_timeout)
        self.tracking_uri = uri
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path.cwd()
        self.retry_interval = retry_interval
        extra_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            extra_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        create = {"experiment_name": experiment_name, "run_name": run_name,
                  "tags": extra_tags | {RUN_KEY_TAG: uuid.uuid4().hex},
                  "artifact_location": artifact_location, "parent_file": parent_file and str(parent_file),
                  "publish": publish and str(publish)}
        self._run = TrackedRun(MlflowClient(uri), uri, run_id, None if run_id else create)
        self._records: list[dict] = []  # what is still to send, in order
        self._kept = self.fallback_dir / UNSENT_FILE
        self._taken_over = self._take_over()  # the records of an earlier start of this run, still in its file
        if run_id and extra_tags:
            self._records.append({"tags": extra_tags})
        self._changed = threading.Condition()
        self._next_attempt = 0.0
        self._attempts = 0
        self._error: BaseException | None = None  # of the latest attempt
        self._warned = False  # once per outage
        self._failures = 0  # attempts in a row that stored nothing
        self._failed_at = 0.0
        self._closing = self._closed = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()
        if not self.flush(start_timeout if _is_http(uri) else None):
            if isinstance(self._error, ConfigError):  # the store answered: the config is wrong
                self._thread_stop()
                raise self._error
            self._warn("not reachable", self._error or TimeoutError(f"no answer within {start_timeout} s"),
                       "; training goes on, and the run is created or continued once it answers (if it never does, "
                       f"`python -m gta sync {self.fallback_dir}` sends everything later)")

    # --- what the training thread calls: it only appends -------------------------------------------
    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        """None while the run was not created yet (its store has not answered)."""
        return self._run.run_id

    @property
    def experiment_id(self) -> str | None:
        return self._run.experiment_id

    @property
    def experiment_name(self) -> str | None:
        return self._run.experiment_name

    @property
    def location(self) -> str:  # type: ignore[override]
        run = f"MLflow run {self.run_id}" if self.run_id else "an MLflow run not created yet"
        return f"{run} in experiment '{self.experiment_name}' at {self.tracking_uri}"

    @property
    def ui_hint(self) -> str | None:  # type: ignore[override]
        if sqlite_path(self.tracking_uri) is not None:
            return f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)} --host 127.0.0.1"
        if _is_http(self.tracking_uri) and self.run_id:
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return None

    def _queue(self, *records: dict) -> None:
        with self._changed:
            self._records.extend(records)
            self._changed.notify_all()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._queue(*({"key": key, "value": float(value), "step": int(step), "timestamp": now}
                      for key, value in metrics.items()))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params. MLflow params are immutable: re-logging one with its value is a no-op, and a value that
        differs from the one already in the run (a resumed run with a changed config) is recorded as the tag
        ``changed_param.<key>``."""
        values = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}
        self._queue(*({"params": chunk} for chunk in chunks(values)))

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

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far is stored (True), or an attempt to send it failed, or ``timeout``
        seconds passed (False). A failed store is tried again at once rather than after ``retry_interval``."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            attempts = self._attempts
            self._next_attempt = 0.0
            self._changed.notify_all()
            while not self._sent_all() and (self._attempts == attempts or self._error is None):
                left = None if end is None else end - time.monotonic()
                if (left is not None and left <= 0) or not self._thread.is_alive():
                    return False
                self._changed.wait(left)
            return self._sent_all()

    def _sent_all(self) -> bool:
        return self._run.opened and not self._records

    # --- the sender thread -------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            with self._changed:
                while not self._closing and not (
                    (self._records or not self._run.opened) and time.monotonic() >= self._next_attempt
                ):
                    wait = self._next_attempt - time.monotonic() if self._records or not self._run.opened else None
                    self._changed.wait(None if wait is None else max(wait, 0.0))
                closing = self._closing
                if closing and self._error is not None and time.monotonic() < self._failed_at + self.retry_interval:
                    return  # an outage at the end: close() keeps the rest in the fallback file
                batch = list(self._records)
            taken = len(batch)
            error = self._attempt(batch)
            with self._changed:
                del self._records[: taken - len(batch)]  # what was stored; the training thread may have added more
                self._attempts += 1
                self._error = error
                if error is not None:
                    # a store that stores nothing is tried less and less often, so that an overloaded server (every
                    # request timed out, then retried) gets to finish what it has; jitter spreads many jobs' retries
                    self._failures = 1 if taken > len(batch) else self._failures + 1
                    wait = min(self.retry_interval * 2 ** (self._failures - 1), MAX_RETRY_INTERVAL)
                    self._failed_at = time.monotonic()
                    self._next_attempt = self._failed_at + wait * random.uniform(0.8, 1.2)
                    # the first attempt's failure is the constructor's to tell
                    if not self._warned and (self._attempts > 1 or isinstance(error, ConfigError)):
                        self._warn(f"could not log {len(self._records)} records", error,
                                   "; keeping them in memory and retrying")
                    self._warned = True
                else:
                    self._failures, self._warned = 0, False
                self._changed.notify_all()
                if closing and (error is not None or not self._records):
                    return

    def _attempt(self, batch: list[dict]) -> BaseException | None:
        """Open the run if it is not yet and send ``batch`` (what it sent leaves it); the error that stopped it."""
        try:
            if not self._run.opened:
                self._run.open()
            sent_before = len(batch)
            self._run.send(batch)
            if self._taken_over and sent_before - len(batch) >= self._taken_over:
                self._kept.unlink(missing_ok=True)  # the earlier start's records are stored now
                self._taken_over = 0
            elif self._taken_over:
                self._taken_over -= sent_before - len(batch)
        except Exception as e:
            return e
        return None

    def _take_over(self) -> int:
        """An earlier start of this run (a requeued job, a rerun of the same command) left records in the fallback
        file: they are this run's, sent first. A file that belongs to another run is sent as it is. Returns how many
        records were taken over."""
        if not self._kept.is_file():
            return 0
        runs = read_unsent(self._kept)
        mine = [(key, records) for key, records in runs.items()
                if key[0] == self.tracking_uri and (key[1] is None or self._run.run_id in (None, key[1]))]
        if len(runs) != 1 or len(mine) != 1:
            try:
                replay_unsent(self._kept)
            except UnreachableServerError as e:
                self._warn(f"could not send {self._kept} (kept)", e)
            return 0
        (_, run_id), records = mine[0]
        earlier = _runs_of(self.tracking_uri, run_id, records, self._run.client)
        if run_id is None:  # the earlier start never reached the store: its creation is this run's
            self._run.create = earlier.create
        else:
            self._run.run_id, self._run.create = run_id, None
        self._records[:0] = records
        return len(records)

    def _thread_stop(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()

    def _warn(self, what: str, error: BaseException, then: str = "") -> None:
        warnings.warn(
            f"MLflow at {self.tracking_uri}: {what}: {_describe(error)}{then}", RuntimeWarning, stacklevel=3
        )

    # --- end -------------------------------------------------------------------------------------
    def close(self, status: str = "FINISHED") -> None:
        """Send what is still buffered and end the run. During an outage it waits for no further attempt: what
        is unsent, the end included (and the run's creation, if it never reached the store), is written to the
        fallback file for :func:`replay_unsent`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue({"status": status})
        self._thread_stop()
        if self._sent_all():
            return
        what = f"{len(self._records) - 1} records and the run's end ({status})"
        try:
            self._kept.parent.mkdir(parents=True, exist_ok=True)
            lines = self._run.unsent(self._records)
            # an earlier start's records, taken over, are in self._records: the file is written anew
            mode = "w" if self._taken_over else "a"
            with self._kept.open(mode) as f:
                f.writelines(json.dumps(record) + "\n" for record in lines)
            where = f"written to {self._kept}; `python -m gta sync {self._kept.parent}` sends them"
        except OSError as e:
            where = f"LOST (could not write them to {self.fallback_dir}: {e})"
        self._warn(f"{what} could not be sent", self._error or TimeoutError("no answer"), f"; {where}")


def replay_unsent(path: Path) -> dict[str, int]:
    """Send what a fallback file kept to the runs it names, creating a run that never reached its store (and
    nesting it under its parent), and remove the file. Returns the number of records sent per run. A store that
    still cannot be reached raises :class:`UnreachableServerError` naming it; the file then keeps what was not
    sent."""
    runs = read_unsent(path)
    sent: dict[str, int] = {}
    done: list[tuple[str, str | None]] = []
    for (uri, run_id), records in runs.items():
        if _is_http(uri):
            bound_requests(10.0)
        run = _runs_of(uri, run_id, records)
        count = len(records)
        try:
            run.open(running=False)
            run.send(records)
        except Exception as e:
            left = [line for key, kept in runs.items() if key not in done
                    for line in (run.unsent(kept) if key == (uri, run_id) else
                                 [{"tracking_uri": key[0], "run_id": key[1], **r} for r in kept])]
            path.write_text("".join(json.dumps(r) + "\n" for r in left))
            raise UnreachableServerError(
                f"could not send {path} to run {run.run_id or '(not created yet)'} at {uri} ({_describe(e)}); the "
                f"{len(left)} records not sent are kept there"
            ) from e
        done.append((uri, run_id))
        sent[run.run_id] = count
    path.unlink()
    return sent
