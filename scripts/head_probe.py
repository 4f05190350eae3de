"""What a model's feature extractor is worth to a labels-only mask predictor.

For every model in a finished run's last checkpoint: its validation mIoU as it is, then with its mask predictor
g fitted anew on the run's labeled images alone while its feature extractor f stays frozen (weights and
BatchNorm statistics). GTA-Seg's student is such a labels-only g on transmitted features, so the probe tells
how much of a model's accuracy its f carries and how much came from what its g learned (an assistant's g
learned from pseudo-labels, a Mean Teacher student's from both).

    python scripts/head_probe.py RUN_DIR [RUN_DIR ...] [--iters 300] [--lr 0.05] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from gta.data import build_loaders, select_split
from gta.engine.checkpoint import LAST, load_checkpoint
from gta.engine.evaluate import Validation


def fit_mask_predictor(model: nn.Module, labeled, iters: int, lr: float, ignore_index: int) -> nn.Module:
    """A copy of ``model`` whose g is re-initialised and trained on ``labeled`` for ``iters`` steps, f frozen."""
    model = copy.deepcopy(model).eval()  # eval: f's BatchNorm statistics stay as the run left them
    model.requires_grad_(False)
    g = model.mask_predictor_parameters()
    for prefix in model.mask_predictor_prefixes:
        for module in model.net.get_submodule(prefix).modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    for p in g:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(g, lr=lr, momentum=0.9)
    step, epoch = 0, 0
    while step < iters:
        labeled.sampler.set_epoch(epoch, 0)
        for image, mask in labeled:
            loss = F.cross_entropy(model(image), mask, ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == iters:
                break
        epoch += 1
    return model


def probe(run_dir: Path, iters: int, lr: float, seed: int) -> list[dict]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    state = load_checkpoint(run_dir / "checkpoints" / LAST)
    source = instantiate(cfg.dataset)
    split = select_split(source, cfg.split, split_dir=run_dir / "split")
    loaders = build_loaders(source, split, batch_size=cfg.data.batch_size, num_workers=0, seed=seed,
                            need_unlabeled=False, val_batch_size=cfg.data.val_batch_size)
    validation = Validation(loaders.val, instantiate(cfg.eval), source.num_classes, source.ignore_index,
                            list(source.class_names))
    rows = []
    for name, weights in state["models"].items():
        model = instantiate(cfg.model, encoder_weights=None)
        model.load_state_dict(weights)
        torch.manual_seed(seed)
        refit = fit_mask_predictor(model, loaders.labeled, iters, lr, source.ignore_index)
        miou = validation.run({"as is": model, "refit": refit}, state["iteration"], torch.device("cpu")).miou
        rows.append({"run": run_dir.name, "model": name, "as is": miou["as is"], "refit": miou["refit"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories of finished gta train runs")
    parser.add_argument("--iters", type=int, default=300, help="steps of the new mask predictor")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| run | model | val mIoU (%) | with g refit on the labels, f frozen |\n|---|---|---|---|")
    for run_dir in args.runs:
        for row in probe(run_dir, args.iters, args.lr, args.seed):
            print(f"| {row['run']} | {row['model']} | {100 * row['as is']:.2f} | {100 * row['refit']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
