"""The ``eval`` command: evaluate a saved model offline with any protocol.

``python -m gta eval checkpoint=RUN_DIR/teacher.pt eval.mode=sliding`` rebuilds the dataset
and network from the run's resolved ``config.yaml`` and prints mIoU and per-class IoU.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from gta.data import build_val_loader
from gta.engine.evaluate import confusion_matrices, iou_from_confusion
from gta.engine.runtime import resolve_device
from gta.saved import load_model


def run(cfg: DictConfig) -> float:
    checkpoint = Path(cfg.checkpoint).expanduser()
    model, run_cfg = load_model(cfg)
    device = resolve_device(run_cfg.get("device", "auto"))
    source = instantiate(run_cfg.dataset)
    protocol = instantiate(run_cfg.eval)
    data = run_cfg.get("data", {})
    val = build_val_loader(
        source, source.pools()["val"], batch_size=data.get("val_batch_size", 1),
        num_workers=data.get("num_workers", 0), pin_memory=device.type == "cuda",
    )  # fmt: skip
    confusion = confusion_matrices(
        {"model": model.to(device)}, val, source.num_classes, source.ignore_index, protocol, device
    )["model"]
    iou = iou_from_confusion(confusion.cpu())
    miou = float(iou.nanmean())

    window = "" if protocol.mode == "whole" else f" {protocol.crop_size}"
    window += f" stride {protocol.stride}" if protocol.mode == "sliding" else ""
    print(f"\n{checkpoint} on {type(source).__name__}: {len(val.dataset)} images, {protocol.mode}{window}")
    width = max(len(name) for name in source.class_names)
    for name, value in zip(source.class_names, iou.tolist(), strict=True):
        shown = "    n/a" if value != value else f"{value:7.2%}"  # NaN: in neither truth nor prediction
        print(f"  {name:<{width}} {shown}")
    print(f"  {'mIoU':<{width}} {miou:7.2%}")
    return miou
