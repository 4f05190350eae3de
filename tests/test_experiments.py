"""The paper presets and every real dataset end to end: each experiment file runs as a 2-iteration twin on
tiny fixtures (small model, 64-pixel crops), and the saved model is evaluated offline with ``eval``."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose
from layouts import TINY, write_cityscapes, write_folder, write_voc
from recording import Recording

from gta.config import PROJECT_ROOT
from gta.eval import run as evaluate
from gta.train import run as train

# the paper recipes; the table grids (hydra.sweeper.params) are run by tests/test_tables.py
EXPERIMENTS = sorted(
    p.stem for p in (PROJECT_ROOT / "experiments").glob("*.yaml") if "sweeper:" not in p.read_text()
)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("datasets")
    write_cityscapes(base / "cityscapes")
    return {
        "voc": write_voc(base / "VOCdevkit" / "VOC2012"),
        "cityscapes": base / "cityscapes",
        "folder": write_folder(base / "mine"),
    }


pytestmark = pytest.mark.usefixtures("hydra_conf")


def runs(roots) -> dict[str, list[str]]:
    """The tiny twin of each preset, and the folder dataset with the default recipe."""
    voc, cityscapes = f"dataset.root={roots['voc']}", f"dataset.root={roots['cityscapes']}"
    return {
        "voc_original": ["+experiment=voc_original", "split=3", voc],
        "voc_aug": ["+experiment=voc_aug", "split=4", voc],
        # a window smaller than the 33x64 images, so the sliding protocol really slides
        "cityscapes": ["+experiment=cityscapes", "split=2", cityscapes, "eval.crop_size=32",
                       "eval.stride=24"],
        "folder": ["dataset=folder", f"dataset.root={roots['folder']}", "dataset.num_classes=3", "split=2",
                   "dataset.unlabeled=unlabeled", "method=mean_teacher"],
    }  # fmt: skip


def test_every_experiment_file_has_a_tiny_twin():
    twins = runs({"voc": 0, "cityscapes": 0, "folder": 0})
    assert EXPERIMENTS == sorted(name for name in twins if name != "folder")


def test_presets_carry_the_papers_recipe():
    voc = compose("train", overrides=["+experiment=voc_original", "split=183"])
    assert voc.dataset._target_ == "gta.data.PascalVOC" and voc.split == 183
    assert (voc.dataset.crop_size, list(voc.dataset.scale_range)) == (513, [0.5, 2.0])
    assert voc.model.output_stride == 8
    assert (voc.model.encoder_name, voc.model.encoder_weights) == ("resnet101", "imagenet")
    assert (voc.optimizer.lr, voc.optimizer.weight_decay, voc.trainer.decoder_lr_mult) == (0.001, 1e-4, 10.0)
    assert (voc.trainer.epochs, voc.trainer.poly_power, voc.data.batch_size) == (80, 0.9, 3)
    assert (voc.eval.mode, voc.eval.crop_size, voc.eval.models) == ("center_crop", 513, "reported")
    assert voc.method._target_ == "gta.methods.GTASeg"
    aug = compose("train", overrides=["+experiment=voc_aug", "split=1323"])
    assert aug.dataset._target_ == "gta.data.PascalVOCAug" and aug.trainer.epochs == 80
    cs = compose("train", overrides=["+experiment=cityscapes", "split=744"])
    assert (cs.dataset._target_, cs.dataset.crop_size, cs.optimizer.lr, cs.optimizer.weight_decay) == (
        "gta.data.Cityscapes", 769, 0.01, 5e-4)
    assert (cs.trainer.epochs, cs.eval.mode, cs.eval.crop_size, cs.eval.stride) == (200, "sliding", 769, 513)
    defaults = [compose("train", overrides=[f"+experiment={e}"]).split for e in EXPERIMENTS]
    assert defaults == [744, 1323, 183]  # cityscapes, voc_aug, voc_original


@pytest.mark.slow
@pytest.mark.parametrize("name", ["voc_original", "voc_aug", "cityscapes", "folder"])
def test_two_iterations_then_offline_evaluation(name, roots, tmp_path):
    overrides = runs(roots)[name]
    cfg = compose("train", overrides=[*overrides, *TINY])
    last = train(cfg, run_dir=tmp_path)

    split = int(cfg.split)
    labeled = (tmp_path / "split" / "labeled.txt").read_text().split()
    assert len(labeled) == split and (tmp_path / "split" / "unlabeled.txt").read_text().split()
    reported = "student" if cfg.method._target_.endswith("SupOnly") else "teacher"
    checkpoint = tmp_path / f"{reported}.pt"
    assert checkpoint.is_file() and (tmp_path / "config.yaml").is_file()

    # The run's own protocol offline gives the run's last validation result.
    offline = evaluate(compose("eval", overrides=[f"checkpoint={checkpoint}"]))
    assert offline == pytest.approx(last, abs=1e-9)
    # Any protocol can be asked for.
    sliding = ["eval.mode=sliding", "eval.crop_size=24", "eval.stride=16", "data.num_workers=0"]
    assert 0 <= evaluate(compose("eval", overrides=[f"checkpoint={checkpoint}", *sliding])) <= 1


@pytest.mark.slow
def test_split_lists_best_and_all_models_are_logged(roots, tmp_path):
    overrides = [*runs(roots)["voc_original"], *TINY, "logger._target_=recording.Recording",
                 "eval.models=all", "trainer.iters=4", "trainer.eval_every=2"]  # fmt: skip
    train(compose("train", overrides=overrides), run_dir=tmp_path)
    logged = Recording.runs[-1]
    artifacts = {(p.name, where) for p, where in logged.artifacts}
    assert {("labeled.txt", "split"), ("unlabeled.txt", "split"), ("config.yaml", None)} <= artifacts
    evaluations = [(step, m) for step, m in logged.metrics if "val/miou" in m]
    assert [step for step, _ in evaluations] == [2, 4]
    assert {"val/teacher/miou", "val/student/miou", "val/assistant/miou"} <= set(evaluations[0][1])  # Table 6
    best = max(m["val/miou"] for _, m in evaluations)
    assert evaluations[-1][1]["val/best_miou"] == pytest.approx(best)
