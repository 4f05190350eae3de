"""``python -m gta eval``: a saved model evaluated offline, from a state_dict or a training-state checkpoint,
with the run's config and any protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gta, tiny
from hydra import compose
from layouts import write_folder
from omegaconf import OmegaConf

from gta.errors import ConfigError
from gta.eval import run as evaluate
from gta.train import run as train

pytestmark = pytest.mark.usefixtures("hydra_conf")


@pytest.fixture(scope="module")
def trained(module_dir: Path) -> tuple[Path, Path, float]:
    """(dataset root, run directory, last validation mIoU) of a one-iteration SupOnly run on folder data."""
    root = write_folder(module_dir / "mine")
    overrides = ["dataset=folder", f"dataset.root={root}", "dataset.num_classes=3", "split=2",
                 "method=suponly", *tiny(iters=1, crop=64)]  # fmt: skip
    last = train(compose("train", overrides=overrides), run_dir=module_dir / "run")
    return root, module_dir / "run", last


def test_eval_reproduces_the_runs_last_evaluation_and_takes_overrides(trained):
    _, run_dir, last = trained
    checkpoint = f"checkpoint={run_dir / 'student.pt'}"
    assert evaluate(compose("eval", overrides=[checkpoint])) == pytest.approx(last, abs=1e-9)
    sliding = ["eval.mode=sliding", "eval.crop_size=24", "eval.stride=16", "data.val_batch_size=1"]
    assert 0 <= evaluate(compose("eval", overrides=[checkpoint, *sliding])) <= 1


def test_eval_takes_a_training_state_checkpoint(trained, tmp_path):
    _, run_dir, last = trained
    checkpoint = f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}"  # its config.yaml is one directory up
    assert evaluate(compose("eval", overrides=[checkpoint, "model_name=student"])) == pytest.approx(last)
    with pytest.raises(ConfigError, match=r"holds the models \['student'\], not 'teacher'"):
        evaluate(compose("eval", overrides=[checkpoint]))
    # a file that holds objects other than plain data is refused, never unpickled
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    state = torch.load(run_dir / "student.pt", weights_only=True)
    torch.save({"models": {"student": state}, "rng": np.random.default_rng(0)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="cannot be read as a PyTorch file"):
        evaluate(compose("eval", overrides=[f"checkpoint={tmp_path / 'foreign.pt'}", "model_name=student"]))


def test_eval_reads_run_configs_from_before_the_model_owned_the_normalisation(trained, tmp_path):
    _, run_dir, last = trained
    cfg = OmegaConf.load(run_dir / "config.yaml")
    del cfg.model["mean"], cfg.model["std"]  # older runs: only dataset.mean / dataset.std
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    overrides = [f"checkpoint={run_dir / 'student.pt'}", f"config={tmp_path / 'config.yaml'}"]
    assert evaluate(compose("eval", overrides=overrides)) == pytest.approx(last, abs=1e-9)


def test_eval_errors_name_what_is_missing(trained, tmp_path):
    _, run_dir, _ = trained
    with pytest.raises(FileNotFoundError, match="No run config"):
        no_config = [f"checkpoint={run_dir / 'student.pt'}", f"config={tmp_path}/no.yaml"]
        evaluate(compose("eval", overrides=no_config))
    with pytest.raises(FileNotFoundError, match=r"checkpoint: no file at .*absent\.pt"):
        evaluate(compose("eval", overrides=[f"checkpoint={tmp_path / 'absent.pt'}"]))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.pt cannot be read"):
        evaluate(compose("eval", overrides=[f"checkpoint={tmp_path / 'broken.pt'}"]))
    torch.save({"net.other.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(ValueError, match=r"foreign\.pt does not fit the run's model"):
        evaluate(compose("eval", overrides=[f"checkpoint={tmp_path / 'foreign.pt'}"]))


@pytest.mark.slow
def test_eval_command_line(trained, tmp_path):
    """``python -m gta eval checkpoint=...`` with the dataset moved: root and protocol overridden."""
    root, run_dir, _ = trained
    moved = tmp_path / "moved"
    root.rename(moved)
    try:
        done = gta("eval", f"checkpoint={run_dir / 'student.pt'}", f"dataset.root={moved}", "eval.mode=center_crop",
                   "eval.crop_size=32", "device=cpu", f"hydra.run.dir={tmp_path / 'eval'}", timeout=120)
    finally:
        moved.rename(root)
    assert "center_crop 32" in done.stdout and "class_2" in done.stdout and "mIoU" in done.stdout
