"""Fixtures shared by the test modules (the helpers they are built from: ``tests/helpers.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import GTA, ROOT, environment, shapes
from hydra import initialize_config_dir

from gta.config import CONF_DIR
from gta.data import SyntheticShapes
from gta.schema import register_configs


@pytest.fixture(scope="module")
def hydra_conf():
    """The project's config tree, for ``hydra.compose`` (a module's tests share one initialisation)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request) -> Iterator[Path]:
    """A directory for what a module's tests share (a trained run weighs hundreds of MB), removed after the
    module's last test unless one of them failed, as ``tmp_path_retention_policy`` does for a test's own."""
    path = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SyntheticShapes:
    """The tiny synthetic dataset of ``helpers.shapes``, generated once per module."""
    generated = shapes(tmp_path_factory.mktemp("data") / "shapes")
    generated.pools()
    return generated


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A sqlite MLflow store for the module's tests (creating its schema is the slow part), in a directory
    that does not exist yet."""
    from mlflow.utils.file_utils import path_to_local_sqlite_uri  # only the modules that track import MLflow

    return path_to_local_sqlite_uri(tmp_path_factory.mktemp("store") / "sub" / "mlflow.db")


@pytest.fixture(scope="module")
def lab():
    """The variables that reach the cluster and the server, in this process's environment for the module."""
    from cluster import CLUSTER  # the modules without the cluster do not import what its tests need

    found = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True)
    if found.returncode != 0:
        why = f"needs the local SLURM cluster and MLflow server ({found.stderr.strip()})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: make test starts them under CI")
        pytest.skip(why)
    variables = dict(line.split("=", 1) for line in found.stdout.split())
    with pytest.MonkeyPatch.context() as patch:
        for key, value in variables.items():
            patch.setenv(key, value)
        yield variables


@pytest.fixture
def tracking_server(tmp_path) -> Iterator:
    """A tracking server of the test's own (tests/cluster.py: TrackingServer), stopped when it ends."""
    from cluster import TrackingServer

    server = TrackingServer(tmp_path / "server")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_sweep():
    """Starts a sweep in the background (its output in ``<sweep dir>.log``); a sweep still running when the
    test ends is stopped, its jobs cancelled."""
    from cluster import job_ids

    started: list[tuple[subprocess.Popen, Path]] = []

    def start(sweep_dir: Path, *overrides: str, **env: str) -> subprocess.Popen:
        log = (sweep_dir.parent / f"{sweep_dir.name}.log").open("w")
        process = subprocess.Popen([*GTA, "train", "--multirun", f"hydra.sweep.dir={sweep_dir}", *overrides],
                                   cwd=ROOT, env=environment(**env), stdout=log, stderr=subprocess.STDOUT, text=True)
        started.append((process, sweep_dir))
        return process

    yield start
    for process, sweep_dir in started:
        if process.poll() is None:
            process.terminate()
            process.wait(30)
            arrays = {job.split("_")[0] for job in job_ids(sweep_dir, None, timeout=0)}
            subprocess.run(["scancel", *arrays], check=False)
