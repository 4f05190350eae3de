"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
from hydra import initialize_config_dir
from trainers import shapes

from gta.config import CONF_DIR, register_configs
from gta.data import SyntheticShapes


@pytest.fixture(scope="module")
def hydra_conf():
    """The project's config tree, for ``hydra.compose`` (a module's tests share one initialisation)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SyntheticShapes:
    """The tiny synthetic dataset of ``trainers.shapes``, generated once per module."""
    generated = shapes(tmp_path_factory.mktemp("data") / "shapes")
    generated.pools()
    return generated
