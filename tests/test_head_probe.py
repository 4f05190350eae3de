"""scripts/head_probe.py: a model's mask predictor fitted anew on the labels while its feature extractor stays."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import ROOT, gta, tiny
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gta.data import build_loaders, select_split


def load_script():
    spec = importlib.util.spec_from_file_location("head_probe", ROOT / "scripts" / "head_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(module_dir):
    gta("train", *tiny(module_dir / "data", iters=4), f"hydra.run.dir={module_dir / 'run'}")
    return module_dir / "run"


@pytest.mark.slow
def test_the_probe_trains_g_alone_and_leaves_f_and_its_statistics(run_dir):
    probe = load_script()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = instantiate(cfg.model, encoder_weights=None)
    source = instantiate(cfg.dataset)
    split = select_split(source, cfg.split, split_dir=run_dir / "split")
    loaders = build_loaders(source, split, batch_size=2, num_workers=0, seed=0, need_unlabeled=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    refit = probe.fit_mask_predictor(model, loaders.labeled, iters=3, lr=0.05, ignore_index=255)

    g = {id(p) for p in refit.mask_predictor_parameters()}
    names = {name for name, p in refit.net.named_parameters() if id(p) in g}
    after = refit.net.state_dict()
    for key, value in before.items():  # f's weights and BatchNorm statistics are the model's; g is new
        changed = not torch.equal(after[key.removeprefix("net.")], value)
        assert changed == (key.removeprefix("net.") in names), key
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model itself is untouched


@pytest.mark.slow
def test_the_probe_reports_every_model_of_a_run(run_dir):
    rows = load_script().probe(run_dir, iters=2, lr=0.05, seed=0)
    assert [r["model"] for r in rows] == ["teacher", "student", "assistant"]
    assert all(0.0 <= r["as is"] <= 1.0 and 0.0 <= r["refit"] <= 1.0 for r in rows)
