"""Experiment files: every paper grid composes point by point, and its instant twin runs end to end.

A test fails when a file in experiments/ is not exercised: each file is a grid (``hydra.sweeper.params``;
recipes are the datasets', conf/recipe) with an instant twin in experiments/instant/.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from helpers import ROOT, configured_method, gta
from hydra import compose
from omegaconf import OmegaConf

from gta.config import CONF_DIR

EXPERIMENTS_DIR = ROOT / "experiments"
INSTANT_DIR = EXPERIMENTS_DIR / "instant"
SHARED_TWIN_SETTINGS = "base"
EXPERIMENTS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def sweep_params(name: str) -> dict[str, str]:
    params = OmegaConf.select(OmegaConf.load(EXPERIMENTS_DIR / f"{name}.yaml"), "hydra.sweeper.params")
    return dict(params or {})


def defaults(path: Path) -> list[str]:
    return [str(d) for d in OmegaConf.load(path).get("defaults", [])]


GRIDS = [name for name in EXPERIMENTS if sweep_params(name)]


def grid_points(params: dict[str, str]) -> list[list[str]]:
    """Every combination of the swept values, seeds aside (a seed never changes the composition)."""
    axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()
            if key != "seed"]
    return [list(point) for point in itertools.product(*axes)]


def test_experiment_group_is_the_experiments_directory():
    link = Path(CONF_DIR) / "experiment"
    assert link.is_symlink() and link.resolve() == EXPERIMENTS_DIR.resolve()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_at_every_grid_point(hydra_conf, name):
    """``+experiment=NAME`` composes, and so does each point of its grid, with a buildable method."""
    base = compose("train", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = dict(base.hydra.sweeper.params or {})
    assert base.report.table == name
    assert set(params.get("seed", "").split(",")) == {"0", "1", "2"}, "the paper reports seeds 0, 1, 2"
    # the paper's recipe of the table's dataset (tests/test_experiments.py checks its values)
    assert base.hydra.runtime.choices.recipe == base.hydra.runtime.choices.dataset != "synthetic"
    assert base.data.splits == "paper"
    for point in grid_points(params):
        cfg = compose("train", overrides=[f"+experiment={name}", *point])
        method = configured_method(cfg)
        assert method.reported in method.evaluated_models(), point


def test_report_labels_are_values_of_the_grid(hydra_conf):
    """Row and column keys a table names (for labels and paper values) are values its grid produces."""
    for name in GRIDS:
        cfg = compose("train", overrides=[f"+experiment={name}"])
        report = cfg.report
        swept = [str(v).split(",") for k, v in sweep_params(name).items() if k != "seed"]
        values = set(itertools.chain.from_iterable(swept)) | {str(cfg.split)}
        rows = set(report.rows) | set(report.paper)
        columns = set(report.columns) | {column for row in report.paper.values() for column in row}
        assert rows <= values | set(report.metrics), (name, rows - values)
        assert columns <= values, (name, columns - values)


def test_every_experiment_file_is_exercised():
    files = {p.relative_to(EXPERIMENTS_DIR).with_suffix("").as_posix()
             for p in EXPERIMENTS_DIR.rglob("*.yaml")}
    assert GRIDS == EXPERIMENTS, f"experiments without a grid: {sorted(set(EXPERIMENTS) - set(GRIDS))}"
    twins = {f"instant/{name}" for name in GRIDS}
    missing = sorted(twins - files)
    assert not missing, f"grids without an instant twin: {missing}"
    extra = sorted(files - set(EXPERIMENTS) - twins - {f"instant/{SHARED_TWIN_SETTINGS}"})
    assert not extra, f"experiment files that no test composes or runs: {extra}"
    for twin in twins:  # each twin is its table plus the shared instant settings
        table = twin.removeprefix("instant/")
        assert defaults(EXPERIMENTS_DIR / f"{twin}.yaml")[:2] == [
            f"/experiment/{table}", f"/experiment/instant/{SHARED_TWIN_SETTINGS}"], twin


@pytest.mark.slow
@pytest.mark.parametrize("name", GRIDS)
def test_instant_twin_runs(name, tmp_path):
    """The twin's whole grid (one seed) trains and evaluates end to end on the CPU."""
    twin = OmegaConf.load(INSTANT_DIR / f"{name}.yaml")
    params = sweep_params(name) | dict(OmegaConf.select(twin, "hydra.sweeper.params") or {})
    sweep = tmp_path / "sweep"
    result = gta("train", "--multirun", f"+experiment=instant/{name}", "seed=0", "logger=none", "device=cpu",
                 f"dataset.root={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}")
    # every point of the grid trained to its end and reported an mIoU
    swept = {key for key in params if key != "seed"}
    ran = [json.loads(path.read_text()) for path in sweep.glob("*/result.json")]
    assert sorted(sorted(o for o in r["overrides"] if o.split("=")[0] in swept) for r in ran) == sorted(
        sorted(point) for point in grid_points(params)), result.stdout[-2000:]
    assert all(0 <= r["value"] <= 1 for r in ran)
