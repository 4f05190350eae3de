"""Pseudo-labels from the teacher: confidence threshold, re-weighting and the weighted loss (Eqs. 6-7)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gta.methods.cutmix import cutmix


@dataclass
class PseudoLabels:
    """Targets for an unlabeled batch: ŷ (ignore index where dropped) and the pixel weights w."""

    image: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor
    confidence: torch.Tensor
    keep: torch.Tensor
    #: real image pixels (not crop padding): kept or dropped by the threshold
    valid: torch.Tensor


@torch.inference_mode()
def predict(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher in eval mode: confidence c = max_k softmax and pseudo-label ŷ = argmax_k, per pixel.

    Runs in inference mode (no autograd bookkeeping at all). The outputs are inference tensors: every
    target built from them by an out-of-place operation (CutMix, the threshold, the weights) is an
    ordinary tensor that backward may save."""
    teacher.eval()
    probs = teacher(images).float().softmax(dim=1)
    confidence, label = probs.max(dim=1)
    return confidence, label


def keep_confident(confidence: torch.Tensor, valid: torch.Tensor, drop: float) -> torch.Tensor:
    """Drop the least confident fraction ``drop`` of the batch's valid pixels.

    The threshold γ is the ``drop``-quantile of c over the valid pixels (the k-th smallest value,
    k = floor(drop * n)); pixels with c <= γ are dropped, so ties at γ are dropped together.

    Computed without a host-device synchronisation: n and k stay on the device, invalid pixels count
    as +inf, and γ is read from the floor(drop * numel) smallest values (k never exceeds that), so no
    size depends on the data.
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"method.drop must lie in [0, 1), got {drop}")
    most = int(drop * confidence.numel())  # a bound from the shape alone
    if most == 0:
        return valid.clone()
    k = (valid.sum().double() * drop).floor().long()  # float64, as int(drop * n) computes it
    masked = torch.where(valid, confidence, torch.inf).flatten()
    smallest = masked.topk(most, largest=False, sorted=True).values
    gamma = smallest.gather(0, (k - 1).clamp_min(0).view(1)).squeeze(0)
    return valid & ((confidence > gamma) | (k == 0))


def make_targets(
    image: torch.Tensor,
    confidence: torch.Tensor,
    label: torch.Tensor,
    valid: torch.Tensor,
    drop: float,
    reweight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ignore_index: int,
) -> PseudoLabels:
    """Threshold (step 2) and re-weight (step 3, Eq. 6) the teacher's predictions."""
    keep = keep_confident(confidence, valid, drop)
    weight = reweight(confidence, keep)
    label = torch.where(keep, label, torch.full_like(label, ignore_index))
    return PseudoLabels(image, label, weight, confidence, keep, valid)


def weighted_cross_entropy(logits: torch.Tensor, targets: PseudoLabels, ignore_index: int) -> torch.Tensor:
    """Eq. 7: Σ w·CE over kept pixels / number of kept pixels (0 when every pixel was dropped)."""
    ce = F.cross_entropy(logits.float(), targets.label, ignore_index=ignore_index, reduction="none")
    return (targets.weight * ce).sum() / targets.keep.sum().clamp_min(1)


def mixed_predictions(
    teacher: nn.Module, unlabeled: torch.Tensor, padding: torch.Tensor, cutmix_prob: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1: the teacher labels the un-mixed images, then CutMix mixes images, confidences c,
    pseudo-labels ŷ and the real-pixel mask with the same boxes. Returns (image, c, ŷ, valid)."""
    confidence, label = predict(teacher, unlabeled)
    image, confidence, label, valid = cutmix([unlabeled, confidence, label, padding != ignore_index], cutmix_prob)
    return image, confidence, label, valid


def teacher_targets(
    teacher: nn.Module,
    unlabeled: torch.Tensor,
    padding: torch.Tensor,
    *,
    drop: float,
    reweight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cutmix_prob: float,
    ignore_index: int,
) -> PseudoLabels:
    """Steps 1-3 of Algorithm 1 on an unlabeled batch (docs/algorithm.md §2): the threshold and the
    weights are computed on the mixed batch."""
    image, confidence, label, valid = mixed_predictions(teacher, unlabeled, padding, cutmix_prob, ignore_index)
    return make_targets(image, confidence, label, valid, drop, reweight, ignore_index)
