"""The README's results figure: validation images of the embedded dataset, their ground truth and the
teacher's, student's and assistant's predictions after a short GTA-Seg run.

Trains the run once on the CPU into outputs/readme_figure/ and reuses it afterwards (--retrain trains it
again); writes docs/images/results.png. The images shown are the validation images with the most classes.
Usage: python scripts/readme_figure.py [--rows 4] [--retrain] [extra train overrides ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gta.config import CONF_DIR
from gta.data import SegmentationFiles, eval_transform
from gta.engine.checkpoint import LAST
from gta.engine.visualize import colorize, denormalize, grid, legend
from gta.eval import load_model
from gta.schema import register_configs
from gta.train import RESULT_FILE
from gta.train import run as train

#: the checkout this script belongs to
ROOT = Path(__file__).resolve().parents[1]

MODELS = ("teacher", "student", "assistant")
#: GTA-Seg on the embedded dataset, shortened to 6 epochs (360 iterations): about 3 minutes on 2 cores
RUN = ["method=gta", "trainer.epochs=6", "trainer.eval_every=0", "logger=none", "device=cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4, help="validation images shown")
    parser.add_argument("--retrain", action="store_true", help="train the run again even if it exists")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "outputs" / "readme_figure")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "results.png")
    parser.add_argument("overrides", nargs="*", help="train overrides laid over the figure's run")
    args = parser.parse_args()

    if args.retrain or not (args.run_dir / RESULT_FILE).is_file():
        shutil.rmtree(args.run_dir, ignore_errors=True)
        register_configs()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            train(compose("train", overrides=[*RUN, *args.overrides]), run_dir=args.run_dir)
    miou = json.loads((args.run_dir / RESULT_FILE).read_text())["miou"]
    checkpoint = str(args.run_dir / "checkpoints" / LAST)
    models = {name: load_model(OmegaConf.create({"checkpoint": checkpoint, "config": None, "model_name": name}))[0]
              for name in MODELS}  # fmt: skip

    source = instantiate(OmegaConf.load(args.run_dir / "config.yaml").dataset)
    val = SegmentationFiles(
        source.pools()["val"], eval_transform(source.mean, source.std), source.num_classes, source.ignore_index
    )
    samples = [val[i] for i in range(len(val))]
    shown = sorted(samples, key=lambda sample: -len(sample[1].unique()))[: args.rows]  # stable: ties by order
    rows = []
    with torch.no_grad():
        for image, mask in shown:
            row = [denormalize(image, source.mean, source.std), colorize(mask, source.palette)]
            row += [colorize(model(image[None]).argmax(dim=1)[0], source.palette) for model in models.values()]
            rows.append(row)
    titles = ["image", "ground truth", *(f"{name} ({miou[name]:.0%} mIoU)" for name in MODELS)]
    figure = grid([[grid(rows, titles, scale=3)], [legend(source.class_names, source.palette)]], gap=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out, optimize=True)
    print(f"{args.out}: {len(rows)} validation images, {figure.width} x {figure.height} px")


if __name__ == "__main__":
    main()
