"""Tracking: a real sqlite MLflow store, read back with MlflowClient (MLflow itself is not mocked)."""

from __future__ import annotations

import json
import socket
import warnings

import numpy as np
import pytest
from helpers import python
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.file_utils import path_to_local_sqlite_uri
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from gta.tracking import Logger, NullLogger, flatten_config
from gta.tracking.mlflow import (
    CHANGED_PARAM_TAG_PREFIX,
    UNSENT_FILE,
    MLflowLogger,
    default_tracking_uri,
    sqlite_path,
)


@pytest.fixture(scope="module")
def client(store) -> MlflowClient:
    return MlflowClient(store)


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def tracking_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "MLflow at" in str(w.message)]


def test_round_trip(store, client, tmp_path):
    logger = MLflowLogger(store, experiment_name="round-trip", run_name="r1", tags={"team": "seg"},
                          fallback_dir=tmp_path)
    assert isinstance(logger, Logger)
    logger.log_params({"lr": 0.01, "model.name": "deeplab"})
    for step in range(3):
        logger.log_metrics({"loss": 1.0 / (step + 1), "miou": 0.1 * step}, step=step)
    (tmp_path / "config.yaml").write_text("lr: 0.01\n")
    split = tmp_path / "split"
    split.mkdir()
    (split / "labeled.txt").write_text("a\nb\n")
    logger.log_artifact(tmp_path / "config.yaml")
    logger.log_artifact(split, artifact_path="data")
    logger.log_image(np.full((8, 6, 3), 200, dtype=np.uint8), "images/pred.png")
    logger.set_tags({"stage": "test"})
    logger.close()

    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params == {"lr": "0.01", "model.name": "deeplab"}
    assert run.data.tags["team"] == "seg" and run.data.tags["stage"] == "test"
    assert history(client, logger.run_id, "loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [s for s, _ in history(client, logger.run_id, "miou")] == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(logger.run_id)}
    assert artifacts == {"config.yaml", "data", "images"}
    assert [a.path for a in client.list_artifacts(logger.run_id, "data/split")] == ["data/split/labeled.txt"]
    assert [a.path for a in client.list_artifacts(logger.run_id, "images")] == ["images/pred.png"]

    # Artifacts sit next to the store, not in the directory the test happens to run in.
    db = sqlite_path(store)
    assert run.info.artifact_uri.startswith((db.parent / "mlartifacts").as_uri())
    assert (db.parent / "mlartifacts").is_dir()
    assert logger.run_id in logger.location and "'round-trip'" in logger.location and store in logger.location
    assert logger.ui_hint == f"mlflow ui --backend-store-uri {store} --host 127.0.0.1"
    logger.close()  # idempotent


def test_nested_run_is_found_by_parent_tag(store, client, tmp_path):
    parent = MLflowLogger(store, experiment_name="nested", run_name="sweep", fallback_dir=tmp_path)
    children = [
        MLflowLogger(store, experiment_name="nested", run_name=f"seed{i}", parent_run_id=parent.run_id,
                     fallback_dir=tmp_path)
        for i in range(2)
    ]
    for child in children:
        child.close()
    parent.close()

    found = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert {r.info.run_id for r in found} == {c.run_id for c in children}


def test_resume_continues_the_same_run(store, client, tmp_path):
    first = MLflowLogger(store, experiment_name="resume", fallback_dir=tmp_path)
    first.log_params({"lr": 0.1, "seed": 1})
    for step in (0, 1):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close("KILLED")
    assert client.get_run(first.run_id).info.status == "KILLED"

    second = MLflowLogger(store, run_id=first.run_id, fallback_dir=tmp_path)
    assert second.run_id == first.run_id and second.experiment_name == "resume"
    assert client.get_run(first.run_id).info.status == "RUNNING"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        second.log_params({"lr": 0.1, "seed": 2})  # same value: no-op; changed value: kept as a tag
    assert not tracking_warnings(record)
    for step in (1, 2, 3):  # step 1, logged before the checkpoint was lost and trained again, is not logged twice
        second.log_metrics({"loss": float(step), "miou": 0.5}, step=step)
    second.close()

    runs = client.search_runs([first.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "seed": "1"}
    assert run.data.tags[CHANGED_PARAM_TAG_PREFIX + "seed"] == "2"
    assert history(client, first.run_id, "loss") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert history(client, first.run_id, "miou") == [(1, 0.5), (2, 0.5), (3, 0.5)]  # a new key: every step


def test_what_a_dead_store_kept_is_sent_later(store, client, tmp_path, monkeypatch):
    """What could not be sent (values, params, tags, files, pictures, the run's end) goes to the fallback file in
    order; ``gta sync`` sends it and removes the file, a store still away leaves the file whole, and a resumed
    run sends its own file first."""
    from gta.sync import main as sync

    def away(*args, **kwargs):
        raise ConnectionError("server away")

    logger = MLflowLogger(store, experiment_name="later", fallback_dir=tmp_path / "a")
    logger.log_metrics({"loss": 1.0}, step=1)
    assert logger.flush()
    monkeypatch.setattr(MlflowClient, "log_batch", away)
    with pytest.warns(RuntimeWarning):
        logger.log_metrics({"loss": 2.0, "miou": 0.5}, step=2)
        assert not logger.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.log_params({"lr": 0.1})
        logger.set_tags({"stage": "outage"})
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "config.yaml").write_text("lr: 0.1\n")
        logger.log_artifact(tmp_path / "a" / "config.yaml")
        logger.log_image(np.full((4, 4, 3), 9, dtype=np.uint8), "pictures/step2.png")
    with pytest.warns(RuntimeWarning, match=r"6 records and the run's end \(FINISHED\) could not be sent.*gta sync"):
        logger.close()
    kept = tmp_path / "a" / UNSENT_FILE
    assert client.get_run(logger.run_id).info.status == "RUNNING"

    with pytest.raises(ConnectionError, match=f"could not send {kept} to run {logger.run_id} at {store}"):
        sync([str(tmp_path)])
    assert len(kept.read_text().splitlines()) == 7  # nothing lost
    monkeypatch.undo()
    sync([str(tmp_path)])
    assert not kept.exists()
    run = client.get_run(logger.run_id)
    assert history(client, logger.run_id, "loss") == [(1, 1.0), (2, 2.0)]
    assert history(client, logger.run_id, "miou") == [(2, 0.5)]
    assert run.data.params == {"lr": "0.1"} and run.data.tags["stage"] == "outage"
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(logger.run_id)} == {"config.yaml", "pictures"}
    assert [a.path for a in client.list_artifacts(logger.run_id, "pictures")] == ["pictures/step2.png"]

    killed = MLflowLogger(store, experiment_name="later", fallback_dir=tmp_path / "b")
    monkeypatch.setattr(MlflowClient, "log_batch", away)
    with pytest.warns(RuntimeWarning):
        killed.log_metrics({"loss": 3.0}, step=3)
        killed.close("KILLED")
    monkeypatch.undo()
    assert (tmp_path / "b" / UNSENT_FILE).is_file()
    resumed = MLflowLogger(store, run_id=killed.run_id, fallback_dir=tmp_path / "b")
    assert not (tmp_path / "b" / UNSENT_FILE).exists()
    resumed.log_metrics({"loss": 3.5}, step=3)  # step 3 arrived late, and is not logged again
    resumed.close()
    assert history(client, killed.run_id, "loss") == [(3, 3.0)]


def test_failed_sends_are_retried(store, client, tmp_path, monkeypatch):
    logger = MLflowLogger(store, experiment_name="flaky", fallback_dir=tmp_path)
    logger.log_metrics({"loss": 0.0}, step=0)
    assert logger.flush()

    def store_down(*args, **kwargs):
        raise MlflowException("database is locked")

    monkeypatch.setattr(MlflowClient, "log_batch", store_down)
    with pytest.warns(RuntimeWarning, match="database is locked") as record:
        logger.log_metrics({"loss": 1.0}, step=1)
        assert not logger.flush()
    assert store in str(record[0].message)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger.log_metrics({"loss": 2.0}, step=2)  # still down: one warning per outage, not per attempt
        logger.log_params({"x": 1})  # params wait with the values, and raise nothing either
        assert not logger.flush()
    assert not tracking_warnings(record)

    monkeypatch.undo()
    logger.log_metrics({"loss": 3.0}, step=3)
    assert logger.flush()
    logger.close()
    assert history(client, logger.run_id, "loss") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(logger.run_id).data.params == {"x": "1"}
    assert not (tmp_path / UNSENT_FILE).exists()


def test_a_store_that_keeps_failing_is_tried_less_and_less_often(store, tmp_path, monkeypatch):
    """Each failure in a row doubles the wait before the next attempt (up to a minute, with some jitter), so that an
    overloaded server is not sent the same batch again and again."""
    from gta.tracking import mlflow as tracking

    logger = MLflowLogger(store, experiment_name="backoff", fallback_dir=tmp_path, retry_interval=2)
    monkeypatch.setattr(tracking.random, "uniform", lambda low, high: 1.0)
    monkeypatch.setattr(MlflowClient, "log_batch", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("busy")))
    waits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(7):
            logger.log_metrics({"loss": 1.0}, step=step)
            assert not logger.flush()
            waits.append(logger._next_attempt - logger._failed_at)
        monkeypatch.undo()
        logger.close()
    assert waits == [2, 4, 8, 16, 32, 60, 60]


def test_unsent_metrics_go_to_the_fallback_file(store, client, tmp_path, monkeypatch):
    fallback = tmp_path / "run"
    logger = MLflowLogger(store, experiment_name="flaky", fallback_dir=fallback)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_batch", disk_full)
    with pytest.warns(RuntimeWarning, match="disk full"):
        logger.log_metrics({"loss": 0.5, "miou": 0.25}, step=7)
        assert not logger.flush()
    with pytest.warns(RuntimeWarning, match=UNSENT_FILE):
        logger.close("FAILED")

    *values, end = [json.loads(line) for line in (fallback / UNSENT_FILE).read_text().splitlines()]
    assert {(r["key"], r["value"], r["step"]) for r in values} == {("loss", 0.5, 7), ("miou", 0.25, 7)}
    assert end == {"tracking_uri": store, "run_id": logger.run_id, "status": "FAILED"}
    assert {r["run_id"] for r in values} == {logger.run_id}


def test_a_run_that_starts_during_an_outage_is_created_later(store, client, tmp_path, monkeypatch):
    """The store does not answer when the run starts: the logger trains on, buffering. Once the store answers, the
    run is created with everything in order; a run whose store never answered keeps its creation in its file, and
    ``gta sync`` creates it, nested under the parent its parent file names by then."""
    from gta.sync import main as sync

    create_run = MlflowClient.create_run

    def away(*args, **kwargs):
        raise ConnectionError("server away")

    monkeypatch.setattr(MlflowClient, "create_run", away)
    with pytest.warns(RuntimeWarning, match="not reachable.*training goes on"):
        back = MLflowLogger(store, experiment_name="outage-start", run_name="back", fallback_dir=tmp_path / "back")
    assert back.run_id is None and "not created yet" in back.location
    back.log_params({"lr": 0.1})
    back.log_metrics({"loss": 1.0}, step=1)
    monkeypatch.setattr(MlflowClient, "create_run", create_run)
    assert back.flush()
    back.log_metrics({"loss": 2.0}, step=2)
    back.close()
    run = client.get_run(back.run_id)
    assert run.info.run_name == "back" and run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert history(client, back.run_id, "loss") == [(1, 1.0), (2, 2.0)]

    # a sweep whose parent and job both started during the outage, and ended before it was over
    parent_file = tmp_path / "sweep" / "mlflow_parent.json"
    monkeypatch.setattr(MlflowClient, "create_run", away)
    with pytest.warns(RuntimeWarning):
        parent = MLflowLogger(store, experiment_name="outage-start", run_name="sweep", fallback_dir=tmp_path / "sweep",
                              publish=str(parent_file))
        job = MLflowLogger(store, experiment_name="outage-start", run_name="job", fallback_dir=tmp_path / "sweep" / "0",
                           parent_file=str(parent_file))
        job.log_metrics({"loss": 3.0}, step=1)
        job.close()
        parent.close()
    assert (tmp_path / "sweep" / "0" / UNSENT_FILE).is_file() and not parent_file.exists()
    monkeypatch.undo()
    sync([str(tmp_path / "sweep")])
    parent_id = json.loads(parent_file.read_text())["run_id"]
    experiment = client.get_experiment_by_name("outage-start").experiment_id
    (child,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert child.info.run_name == "job" and child.info.status == "FINISHED"
    assert history(client, child.info.run_id, "loss") == [(1, 3.0)]
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_a_creation_that_timed_out_after_reaching_the_store_is_not_made_twice(store, client, tmp_path, monkeypatch):
    create_run = MlflowClient.create_run

    def made_then_timed_out(self, *args, **kwargs):
        create_run(self, *args, **kwargs)
        raise TimeoutError("read timed out")

    monkeypatch.setattr(MlflowClient, "create_run", made_then_timed_out)
    with pytest.warns(RuntimeWarning, match="read timed out"):
        logger = MLflowLogger(store, experiment_name="slow-create", fallback_dir=tmp_path)
    monkeypatch.undo()
    logger.log_metrics({"loss": 1.0}, step=1)
    assert logger.flush()
    logger.close()
    (run,) = client.search_runs([client.get_experiment_by_name("slow-create").experiment_id])
    assert run.info.run_id == logger.run_id and history(client, logger.run_id, "loss") == [(1, 1.0)]


def test_a_frozen_server_holds_no_logging_call(tmp_path, monkeypatch):
    """A server that accepts connections and never answers (a frozen process, a partition): the constructor and
    every logging call return while the requests hang, and the run's end goes to the fallback file."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # this process's MLflow requests: back to its own after
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(64)  # the kernel completes each connection; nobody reads
        uri = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        with pytest.warns(RuntimeWarning, match="not reachable"):
            logger = MLflowLogger(uri, fallback_dir=tmp_path, start_timeout=0.2, retry_interval=60)
        for step in range(100):
            logger.log_metrics({"loss": float(step)}, step=step)
        assert logger.run_id is None
        with pytest.warns(RuntimeWarning, match="100 records"):
            logger.close()
    create, *records, end = [json.loads(line) for line in (tmp_path / UNSENT_FILE).read_text().splitlines()]
    assert create["create"]["experiment_name"] == "gta" and create["run_id"] is None
    assert [r["step"] for r in records] == list(range(100)) and end["status"] == "FINISHED"


def test_sqlite_store_location(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OSError, match="not-a-dir"):
        MLflowLogger(path_to_local_sqlite_uri(blocker / "mlflow.db"))

    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///rel/mlflow.db") == tmp_path / "rel" / "mlflow.db"
    assert sqlite_path("sqlite:///:memory:") is None and sqlite_path("http://host:5000") is None

    uri = default_tracking_uri()  # the directory the command runs in, whether gta is a checkout or installed
    assert uri.startswith("sqlite:///") and sqlite_path(uri) == tmp_path / "mlflow.db"


def test_flatten_config():
    cfg = OmegaConf.create({
        "lr": 0.01,
        "model": {"name": "deeplab", "channels": [64, 128], "head": {"lr": "${lr}"}},
        "aug": [{"name": "flip"}],
        "note": "x" * (MAX_PARAM_VAL_LENGTH + 10),
        "todo": "???",
        "none": None,
        "empty": {},
    })
    flat = flatten_config(cfg)
    assert flat == {
        "lr": "0.01",
        "model.name": "deeplab",
        "model.channels": "[64, 128]",
        "model.head.lr": "0.01",
        "aug": "[{'name': 'flip'}]",
        "note": "x" * MAX_PARAM_VAL_LENGTH,
        "todo": "???",
        "none": "None",
        "empty": "{}",
    }
    assert flatten_config({"a": {"b": 1}, "c": cfg.model.head}, sep="/") == {"a/b": "1", "c/lr": "0.01"}


def test_null_logger_never_imports_mlflow():
    NullLogger().close()
    code = (
        "import sys, numpy as np, gta.tracking as t\n"
        "log = t.NullLogger()\n"
        "log.log_params(t.flatten_config({'a': {'b': 1}})); log.log_metrics({'x': 1.0}, step=0)\n"
        "log.log_artifact('nope'); log.log_image(np.zeros((2, 2, 3), np.uint8), 'i.png')\n"
        "log.set_tags({'a': 'b'}); log.close('FAILED')\n"
        "assert log.run_id is None and log.location == 'nowhere (logger=none)'\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    python("-c", code)
