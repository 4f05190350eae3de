"""Validation: whole-image, center-crop or sliding-window inference, and IoU from a confusion matrix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from gta.errors import ConfigError

MODES = ("whole", "center_crop", "sliding")


@dataclass(frozen=True)
class EvalProtocol:
    """How a validation image is fed to the network (docs/algorithm.md §6: VOC center crop, Cityscapes sliding),
    and which of a method's models are evaluated during training."""

    mode: str = "whole"
    crop_size: int = 513
    stride: int = 513
    #: "reported", "all" (Table 6: teacher, student and assistant) or a list of model names
    models: str | Sequence[str] = "reported"
    #: center_crop only: pad images smaller than the crop to ``crop_size``, the padding labelled with this
    #: class, so that it counts in the confusion matrix (the released code's VOC validation: docs/algorithm.md
    #: §5.8); None evaluates the (smaller) image as it is
    pad_label: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"eval.mode must be one of {MODES}, got '{self.mode}'")
        if self.stride <= 0 or self.crop_size <= 0:
            raise ConfigError(
                f"eval.crop_size and eval.stride must be positive, got {self.crop_size}, {self.stride}"
            )
        if self.mode == "sliding" and self.stride > self.crop_size:
            raise ConfigError(
                f"eval.stride={self.stride} > eval.crop_size={self.crop_size} would leave pixels between "
                "sliding windows unpredicted; use a stride <= the window"
            )
        if isinstance(self.models, str) and self.models not in ("reported", "all"):
            object.__setattr__(self, "models", (self.models,))  # one model name
        elif not isinstance(self.models, str):
            object.__setattr__(self, "models", tuple(str(m) for m in self.models))

    def select(self, models: dict[str, nn.Module], reported: str) -> dict[str, nn.Module]:
        """The models to evaluate, in the method's order; ``reported`` is always one of them."""
        if self.models == "all":
            return dict(models)
        wanted = {reported} if self.models == "reported" else {reported, *self.models}
        unknown = sorted(wanted - set(models))
        if unknown:
            raise ConfigError(
                f"eval.models names {unknown}, which this method does not evaluate; choose 'reported', 'all' "
                f"or a list from {list(models)}"
            )
        return {name: model for name, model in models.items() if name in wanted}


def center_crop(
    image: torch.Tensor, mask: torch.Tensor, size: int, pad_label: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The central ``size`` x ``size`` window; with ``pad_label`` a smaller image is first padded at the
    bottom and right (image with zeros, i.e. the mean colour once normalised; mask with ``pad_label``)."""
    h, w = image.shape[-2:]
    if pad_label is not None and (h < size or w < size):
        border = (0, max(0, size - w), 0, max(0, size - h))
        image, mask = F.pad(image, border, value=0.0), F.pad(mask, border, value=pad_label)
        h, w = image.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[..., top : top + size, left : left + size], mask[..., top : top + size, left : left + size]


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def sliding_logits(
    model: nn.Module, image: torch.Tensor, window: int, stride: int, num_classes: int
) -> torch.Tensor:
    """Average the logits of overlapping ``window``-sized crops; windows are clipped to the image."""
    b, _, h, w = image.shape
    logits = image.new_zeros(b, num_classes, h, w)
    counts = image.new_zeros(1, 1, h, w)
    for top in _starts(h, window, stride):
        for left in _starts(w, window, stride):
            crop = image[..., top : top + window, left : left + window]
            logits[..., top : top + window, left : left + window] += model(crop).float()
            counts[..., top : top + window, left : left + window] += 1
    return logits / counts


@torch.no_grad()
def predict_logits(
    model: nn.Module, image: torch.Tensor, protocol: EvalProtocol, num_classes: int
) -> torch.Tensor:
    if protocol.mode == "sliding":
        return sliding_logits(model, image, protocol.crop_size, protocol.stride, num_classes)
    return model(image).float()


@torch.no_grad()
def confusion_matrices(
    models: dict[str, nn.Module],
    batches: Iterable[Sequence[torch.Tensor]],
    num_classes: int,
    ignore_index: int,
    protocol: EvalProtocol,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One pass over the validation data, every model on every image; rows are truth, columns prediction."""
    meters = {
        name: MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)
        for name in models
    }
    meters = {name: meter.to(device) for name, meter in meters.items()}
    for model in models.values():
        model.eval()
    for image, mask in _flatten(batches):
        image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        if protocol.mode == "center_crop":
            image, mask = center_crop(image, mask, protocol.crop_size, protocol.pad_label)
        for name, model in models.items():
            pred = predict_logits(model, image, protocol, num_classes).argmax(dim=1)
            meters[name].update(pred, mask)
    # In a distributed run compute() sums the matrices of all processes (torchmetrics syncs its state
    # with dist_reduce_fx="sum"); each rank's validation loader holds a disjoint share (build_val_loader),
    # so no image is counted twice.
    return {name: meter.compute() for name, meter in meters.items()}


def _flatten(batches: Iterable) -> Iterable[Sequence[torch.Tensor]]:
    """``(image, mask)`` batches; a validation loader yields a list of them when a batch mixes sizes."""
    for batch in batches:
        if isinstance(batch[0], torch.Tensor):
            yield batch
        else:
            yield from batch


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both truth and prediction."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


@dataclass
class EvalResult:
    step: int
    miou: dict[str, float]
    iou: dict[str, list[float]]
    confusion: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class Validation:
    """What a run is evaluated on: the validation batches, the protocol and the dataset's classes."""

    loader: Iterable
    protocol: EvalProtocol
    num_classes: int
    ignore_index: int
    class_names: list[str]

    def run(self, models: dict[str, nn.Module], step: int, device: torch.device) -> EvalResult:
        confusion = confusion_matrices(models, self.loader, self.num_classes, self.ignore_index, self.protocol, device)
        ious = {name: iou_from_confusion(cm) for name, cm in confusion.items()}
        return EvalResult(
            step=step,
            miou={name: float(iou.nanmean()) for name, iou in ious.items()},
            iou={name: iou.tolist() for name, iou in ious.items()},
            confusion=confusion,
        )

    def metrics(self, result: EvalResult) -> dict[str, float]:
        """``val/<model>/miou`` and ``val/<model>/iou/<class>`` (classes seen in truth or prediction)."""
        metrics = {}
        for name, iou in result.iou.items():
            metrics[f"val/{name}/miou"] = result.miou[name]
            metrics |= {
                f"val/{name}/iou/{cls}": v for cls, v in zip(self.class_names, iou, strict=True) if v == v  # not NaN
            }
        return metrics

