"""Fixtures shared by the test modules (the helpers they are built from: ``tests/helpers.py``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import shapes
from hydra import initialize_config_dir

from gta.config import CONF_DIR, register_configs
from gta.data import SyntheticShapes


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
