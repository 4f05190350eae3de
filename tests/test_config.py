"""Every option of every config group composes against the typed schema and builds its object."""

import re
from pathlib import Path

import pytest
from helpers import ROOT
from hydra import compose
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gta.config import CONF_DIR
from gta.contract import IMAGENET_MEAN, IMAGENET_STD

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())


def is_global(path: Path) -> bool:
    """Options in the global package (launcher, experiment, the methods that set other groups) set several groups at once;
    tests/test_sweeps.py and tests/test_experiments.py compose and run them."""
    return path.read_text().startswith("# @package _global_")


OPTIONS = [
    (g, p.stem) for g in GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml")) if not is_global(p)
]


pytestmark = pytest.mark.usefixtures("hydra_conf")


def required(group: str, option: str) -> list[str]:
    if group == "model":
        # no pretrained weights can be fetched in tests; an installed package's can be read
        weights = OmegaConf.load(Path(CONF_DIR) / "model" / f"{option}.yaml").get("encoder_weights")
        return [] if weights in (None, "package") else ["model.encoder_weights=null"]
    if (group, option) == ("dataset", "folder"):
        return ["dataset.num_classes=4"]  # the one value a folder dataset cannot default
    return []


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(group, option, tmp_path):
    cfg = compose("train", overrides=[f"{group}={option}", *required(group, option)])
    node = cfg[group]
    if group == "model":
        model = instantiate(node)
        assert model.feature_extractor_parameters() and model.mask_predictor_parameters()
    elif group == "method":
        method = instantiate(node, model=lambda: instantiate(cfg.model))
        assert method.reported in method.evaluated_models()
    elif group == "logger":
        overrides = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"} if "tracking_uri" in node else {}
        instantiate(node, **overrides).close()
    else:
        assert instantiate(node) is not None


def documented_overrides() -> list[str]:
    """The keys of docs/usage.md's table "Overrides scripts can rely on" (each `key=` of its first column)."""
    section = (ROOT / "docs" / "usage.md").read_text().split("## Overrides scripts can rely on\n", 1)[1]
    rows = [line for line in section.lstrip("\n").split("\n\n", 1)[0].splitlines() if line.startswith("| `")]
    return [key for row in rows for key in re.findall(r"`([\w.+]+)=`", row.split("|")[1])]


def test_every_override_the_docs_promise_exists():
    """Each key of the table is a config group (``dataset=``, ``+experiment=``) or a key of the composed
    config, Hydra's own included (``hydra.run.dir=``)."""
    keys = documented_overrides()
    assert "trainer.iters" in keys and "hydra.run.dir" in keys, f"the table of docs/usage.md was not found: {keys}"
    cfg = compose("train", return_hydra_config=True)
    absent = object()
    missing = [key for key in keys if not (Path(CONF_DIR) / key.removeprefix("+")).is_dir()
               and OmegaConf.select(cfg, key, default=absent) is absent]
    assert not missing, f"overrides docs/usage.md promises that the config does not have: {missing}"


def test_the_normalisation_is_the_models_unless_the_dataset_sets_its_own():
    """It belongs to the pretrained weights: the model config says it, the dataset (which the transforms,
    eval, predict, export and the pictures read) takes it from there."""
    cfg = compose("train")
    assert cfg.dataset.mean == cfg.model.mean == IMAGENET_MEAN and cfg.dataset.std == cfg.model.std == IMAGENET_STD
    cfg = compose("train", overrides=["model=deeplabv3plus_lite0"])
    assert cfg.dataset.mean == cfg.dataset.std == [0.5] * 3
    assert instantiate(cfg.dataset).mean == (0.5,) * 3
    cfg = compose("train", overrides=["model=deeplabv3plus_lite0", "dataset.mean=[0.4,0.4,0.4]"])
    assert (cfg.dataset.mean, cfg.dataset.std, cfg.model.mean) == ([0.4] * 3, [0.5] * 3, [0.5] * 3)


@pytest.mark.parametrize(("override", "culprit"), [
    ("method.dorp=0.3", "method.dorp"),
    ("trainer.iterations=3", "trainer.iterations"),
    ("method.drop=lots", "method.drop"),
    ("trainer.iters=many", "trainer.iters"),
    ("reweight=laplas", "laplas"),
])
def test_unknown_keys_and_wrong_types_fail_naming_the_culprit(override, culprit):
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", overrides=[override])
    message = str(err.value) + str(err.value.__cause__)
    assert culprit in message
