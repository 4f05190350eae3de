"""How good the first pseudo-labels are: the warmed-up student (SupOnly for the warm-up's iterations)
labels the unlabeled images of the embedded dataset, whose masks exist, and this counts, among the
object pixels the threshold keeps, how many get their class and how many another object's class.

    python scripts/pseudo_label_quality.py [--jitters 0.03 0.07] [--iters 60] [--seed 0] [overrides ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from gta.config import CONF_DIR
from gta.data import build_val_loader, select_split
from gta.methods.pseudo_label import keep_confident, predict
from gta.schema import register_configs
from gta.train import run


def quality(overrides: list[str], drop: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("train", overrides=["method=suponly", "logger=none", "trainer.progress=none", *overrides])
        run(cfg, Path(tmp))
        model = instantiate(cfg.model, encoder_weights=None)
        model.load_state_dict(torch.load(Path(tmp) / "student.pt", weights_only=True))
    source = instantiate(cfg.dataset)
    split = select_split(source, cfg.split, cfg.data.split_seed, None, cfg.data.splits)
    right = swapped = kept = 0
    for image, mask in build_val_loader(source, split.unlabeled, batch_size=20):
        confidence, label = predict(model, image)
        objects = keep_confident(confidence, mask != source.ignore_index, drop) & (mask > 0)
        right += ((label == mask) & objects).sum().item()
        swapped += ((label != mask) & (label > 0) & objects).sum().item()
        kept += objects.sum().item()
    return {"right": right / kept, "another object": swapped / kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jitters", type=float, nargs="+", default=[0.03, 0.07])
    parser.add_argument("--iters", type=int, default=60, help="the warm-up's iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    register_configs()
    print("| dataset.hue_jitter | kept object pixels labeled right | labeled as another object |\n|---|---|---|")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for jitter in args.jitters:
            root = Path(tempfile.gettempdir()) / f"gta-synthetic-jitter{jitter}"
            drop = compose("train").method.drop
            found = quality([f"dataset.hue_jitter={jitter}", f"dataset.root={root}", f"trainer.iters={args.iters}",
                             f"seed={args.seed}", *args.overrides], drop)
            print(f"| {jitter} | {found['right']:.1%} | {found['another object']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
