"""The datasets' recipes and every real dataset end to end: the design card's commands compose the paper's
recipe, a command-line choice wins over it, each recipe runs as a 2-iteration twin on tiny fixtures (small
model, 64-pixel crops: ``helpers.tiny``), and the saved model is evaluated offline with ``eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import Recorder, tiny
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from layouts import write_cityscapes, write_folder, write_voc
from omegaconf import OmegaConf

from gta.config import CONF_DIR
from gta.eval import run as evaluate
from gta.train import RESULT_FILE
from gta.train import run as train

# conf/recipe: what each dataset brings (the paper's recipe for the real ones)
RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml"))


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
    """The tiny twin of each dataset with its recipe: random splits that the fixtures allow (the paper's
    lists are trained on in tests/test_splits.py)."""
    voc, cityscapes = f"dataset.root={roots['voc']}", f"dataset.root={roots['cityscapes']}"
    return {
        "pascal_voc": ["dataset=pascal_voc", "data.splits=random", "split=3", voc],
        "pascal_voc_aug": ["dataset=pascal_voc_aug", "data.splits=random", "split=4", voc],
        # a window smaller than the 33x64 images, so the sliding protocol really slides
        "cityscapes": ["dataset=cityscapes", "data.splits=random", "split=2", cityscapes, "eval.crop_size=32",
                       "eval.stride=24"],
        "folder": ["dataset=folder", f"dataset.root={roots['folder']}", "dataset.num_classes=3",
                   "dataset.unlabeled=unlabeled", "method=mean_teacher"],
    }  # fmt: skip


def test_every_real_dataset_recipe_has_a_tiny_twin():
    twins = runs({"voc": 0, "cityscapes": 0, "folder": 0})
    assert sorted(RECIPES) == sorted([*twins, "synthetic"])  # the demo runs in tests/test_train.py


#: what a recipe decides: network, output stride, weights, crop, rescale, batch, optimiser, lr, weight decay,
#: decoder multiplier, schedule, epochs, warm-up, EMA, evaluation protocol, reported model, split family
KEYS = [
    "model.encoder_name", "model.output_stride", "model.encoder_weights", "dataset.crop_size",
    "dataset.scale_range", "data.batch_size", "optimizer._target_", "optimizer.lr", "optimizer.momentum",
    "optimizer.weight_decay", "trainer.decoder_lr_mult", "trainer.poly_power", "trainer.epochs",
    "method.warmup_epochs", "ema.alpha", "eval.mode", "eval.crop_size", "eval.stride", "eval.models",
    "data.splits",
]  # fmt: skip


def recipe(cfg) -> dict:
    return {key: OmegaConf.to_object(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, key)) else v
            for key in KEYS}


def values(*given) -> dict:
    return dict(zip(KEYS, given, strict=True))


SGD = "torch.optim.SGD"
VOC = values("resnet101", 8, "imagenet", 513, [0.5, 2.0], 3, SGD, 0.001, 0.9, 1e-4, 10.0, 0.9, 80, 1, 0.99,
             "center_crop", 513, 513, "reported", "paper")  # fmt: skip
CITYSCAPES = values("resnet101", 8, "imagenet", 769, [0.5, 2.0], 2, SGD, 0.01, 0.9, 5e-4, 10.0, 0.9, 200, 1,
                    0.99, "sliding", 769, 513, "reported", "paper")  # fmt: skip
DEMO = values("tu-resnet10t", 16, None, 64, [0.75, 1.5], 8, SGD, 0.05, 0.9, 1e-4, 1.0, 0.9, 10, 1, 0.99,
              "whole", 513, 513, "all", "random")  # fmt: skip


@pytest.mark.parametrize(("command", "expected", "dataset", "split"), [
    (["dataset=cityscapes", "split=744"], CITYSCAPES, "gta.data.Cityscapes", 744),
    (["dataset=pascal_voc", "split=183"], VOC, "gta.data.PascalVOC", 183),
    (["dataset=pascal_voc_aug", "split=1323"], VOC, "gta.data.PascalVOCAug", 1323),
    ([], DEMO, "gta.data.SyntheticShapes", 20),
], ids=["cityscapes-744", "pascal_voc-183", "pascal_voc_aug-1323", "synthetic"])  # fmt: skip
def test_the_design_cards_commands_bring_the_papers_recipe(command, expected, dataset, split):
    cfg = compose("train", overrides=command)
    assert recipe(cfg) == expected
    assert (cfg.dataset._target_, cfg.split, cfg.method._target_) == (dataset, split, "gta.methods.GTASeg")
    # without a split, each dataset trains on the setting the paper's ablations use
    assert compose("train", overrides=command[:1]).split == split


def test_the_folder_recipe_is_the_voc_one_for_data_without_a_protocol():
    cfg = compose("train", overrides=["dataset=folder", "dataset.num_classes=3"])
    assert recipe(cfg) == VOC | {"eval.mode": "whole", "data.splits": "random"} and cfg.split == "all"


def test_a_command_line_choice_wins_over_the_recipe():
    small = OmegaConf.load(Path(CONF_DIR) / "model" / "deeplabv3plus_small.yaml")
    del small["defaults"]  # the option's schema; what follows are its values
    cfg = compose("train", overrides=["dataset=cityscapes", "model=deeplabv3plus_small", "trainer.epochs=2",
                                      "optimizer.lr=0.2", "eval.mode=whole", "data.splits=cps", "split=1_16"])
    assert OmegaConf.merge(cfg.model, small) == cfg.model  # the group's own values, none of the recipe's
    assert (cfg.trainer.epochs, cfg.optimizer.lr, cfg.eval.mode, cfg.data.splits) == (2, 0.2, "whole", "cps")
    assert (cfg.optimizer.weight_decay, cfg.data.batch_size) == (5e-4, 2)  # the rest stays the recipe's
    # another recipe on a dataset: the CPU demo on Cityscapes
    demo = compose("train", overrides=["dataset=cityscapes", "recipe=synthetic"])
    assert recipe(demo) == DEMO | {"dataset.crop_size": 769, "dataset.scale_range": [0.5, 2.0]}
    # and over an experiment file's choices
    table = compose("train", overrides=["+experiment=table3", "model=deeplabv3plus_small", "split=100"])
    assert OmegaConf.merge(table.model, small) == table.model and table.split == 100
    assert {k: v for k, v in recipe(table).items() if not k.startswith("model.")} == {
        k: v for k, v in CITYSCAPES.items() if not k.startswith("model.")}


def test_a_sweep_over_datasets_gives_each_job_its_recipe():
    """``--multirun dataset=synthetic,pascal_voc,cityscapes``: the jobs the basic sweeper composes."""
    parsed = OverridesParser.create().parse_overrides(["dataset=synthetic,pascal_voc,cityscapes", "seed=1"])
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    configs = [compose("train", overrides=job, return_hydra_config=True) for job in jobs]
    assert [c.hydra.runtime.choices.recipe for c in configs] == ["synthetic", "pascal_voc", "cityscapes"]
    assert [recipe(c) for c in configs] == [DEMO, VOC, CITYSCAPES] and {c.seed for c in configs} == {1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pascal_voc", "pascal_voc_aug", "cityscapes", "folder"])
def test_two_iterations_then_offline_evaluation(name, roots, tmp_path):
    overrides = runs(roots)[name]
    cfg = compose("train", overrides=[*overrides, *tiny(crop=64)])
    last = train(cfg, run_dir=tmp_path)

    labeled = (tmp_path / "split" / "labeled.txt").read_text().split()
    assert len(labeled) == (5 if name == "folder" else cfg.split)  # folder: split=all, its 5 train images
    assert (tmp_path / "split" / "unlabeled.txt").read_text().split()
    # the reported (and saved) model: the student while a teacher-based method is still in its warm-up
    reported = json.loads((tmp_path / RESULT_FILE).read_text())["reported"]
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
    overrides = [*runs(roots)["pascal_voc"], *tiny(iters=4, crop=64), "logger._target_=helpers.Recorder",
                 "eval.models=all", "trainer.eval_every=2"]  # fmt: skip
    train(compose("train", overrides=overrides), run_dir=tmp_path)
    logged = Recorder.instances[-1]
    artifacts = {(p.name, where) for p, where in logged.artifacts}
    assert {("labeled.txt", "split"), ("unlabeled.txt", "split"), ("config.yaml", None)} <= artifacts
    evaluations = [(step, m) for step, m in sorted(logged.metrics.items()) if "val/miou" in m]
    assert [step for step, _ in evaluations] == [2, 4]
    assert {"val/teacher/miou", "val/student/miou", "val/assistant/miou"} <= set(evaluations[0][1])  # Table 6
    best = max(m["val/miou"] for _, m in evaluations)
    assert evaluations[-1][1]["val/best_miou"] == pytest.approx(best)
