"""The extension points of gta/contract.py: a network or a method that lacks a member stops a run naming it,
and a network that is not an smp model, built by ``_target_``, trains, evaluates, predicts and exports."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import tiny
from hydra import compose
from hydra.core.config_store import ConfigStore
from PIL import Image
from tiny import TinySegmenter
from torch import nn

from gta import eval as evaluate
from gta import export, predict, train
from gta.contract import NETWORK_MEMBERS, Method, check_method, check_network
from gta.errors import ContractError
from gta.methods import SupOnly

pytestmark = pytest.mark.usefixtures("hydra_conf")


class WithoutParamGroups(TinySegmenter):
    param_groups = None  # not callable: the member is missing


class PlainForward(TinySegmenter):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_the_protocol_lists_what_the_methods_use():
    assert NETWORK_MEMBERS == ("forward", "feature_extractor_parameters", "mask_predictor_parameters",
                               "new_mask_predictor", "param_groups")
    network = TinySegmenter()
    assert check_network(network, "here") is network


@pytest.mark.parametrize(("network", "missing"), [
    (WithoutParamGroups(), "lacks param_groups"),
    (PlainForward(), "lacks the mask_predictor argument of forward"),
    (object(), "lacks nn.Module as its base class, forward, feature_extractor_parameters"),
])
def test_a_network_lacking_a_member_is_named_where_the_model_is_built(network, missing):
    with pytest.raises(ContractError, match=rf"model._target_=x built a \w+, which {re.escape(missing)}"):
        check_network(network, "model._target_=x")


def test_train_checks_the_network_it_builds():
    cfg = compose("train", overrides=["model=deeplabv3plus_small"])
    cfg.model = {"_target_": f"{__name__}.WithoutParamGroups"}
    with pytest.raises(ContractError, match=rf"model._target_={__name__}.WithoutParamGroups built a "
                                            "WithoutParamGroups, which lacks param_groups"):
        train.network_factory(cfg.model)()


class NoStep(Method):
    def trained_models(self) -> dict[str, nn.Module]:
        return {}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {}


def test_a_method_lacking_a_member_or_not_a_method_is_named():
    check_method(SupOnly, "method._target_=gta.methods.SupOnly")
    with pytest.raises(ContractError, match="method._target_=x: NoStep does not implement training_step"):
        check_method(NoStep, "method._target_=x")
    with pytest.raises(ContractError, match="method._target_=y is <class 'object'>, not a subclass"):
        check_method(object, "method._target_=y")


@pytest.mark.slow
def test_a_network_by_target_trains_evaluates_predicts_and_exports(tmp_path):
    """No smp key (encoder_name, encoder_weights, weights_path) is read on the way."""
    ConfigStore.instance().store(group="model", name="tiny_by_target",
                                 node={"_target_": "tiny.TinySegmenter", "num_classes": "${dataset.num_classes}"})
    overrides = [o for o in tiny(tmp_path / "data") if not o.startswith("model=")]
    cfg = compose("train", overrides=[*overrides, "model=tiny_by_target", "method=suponly"])
    run_dir = tmp_path / "run"
    assert 0.0 <= train.run(cfg, run_dir) <= 1.0
    checkpoint = f"checkpoint={run_dir / 'student.pt'}"
    miou = evaluate.run(compose("eval", overrides=[checkpoint, "device=cpu"]))
    assert 0.0 <= miou <= 1.0
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    assert predict.run(compose("predict", overrides=[checkpoint, f"input={tmp_path / 'in'}",
                                                     f"output={tmp_path / 'out'}", "device=cpu"])) == 1
    assert (tmp_path / "out" / "a.png").is_file()
    path = export.run(compose("export", overrides=[checkpoint, f"output={tmp_path / 'model.pt'}"]))
    assert path.is_file()
