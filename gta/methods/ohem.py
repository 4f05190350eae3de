"""The labeled loss of the methods whose released recipes mine hard pixels (UniMatch's, CPS's and U2PL's on
Cityscapes, U2PL's on VOC too): online hard example mining, or the plain cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def labeled_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, ohem_thresh: float | None,
                          ohem_min_kept: int) -> Tensor:
    """The cross-entropy of the labeled pixels, or, with ``ohem_thresh``, of the hard ones only."""
    if ohem_thresh is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    return ohem_cross_entropy(logits, target, ignore_index, ohem_thresh, ohem_min_kept)


def ohem_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, thresh: float, min_kept: int) -> Tensor:
    """The cross-entropy of the hard labeled pixels only (online hard example mining): those whose predicted
    probability of their class is at most ``thresh``, or, where fewer than ``min_kept`` are, the
    ``min_kept`` least probable. With fewer than ``min_kept`` labeled pixels in the batch, all count."""
    valid = target != ignore_index
    if min_kept > int(valid.sum()):
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    probs = logits.detach().float().softmax(dim=1)
    p_true = probs.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    p_true = torch.where(valid, p_true, 1.0).flatten()
    threshold = torch.as_tensor(thresh, device=logits.device)
    if min_kept > 0:
        threshold = torch.maximum(threshold, p_true.kthvalue(min(min_kept, p_true.numel())).values)
    hard = (p_true <= threshold).view_as(target) & valid
    return F.cross_entropy(logits, torch.where(hard, target, ignore_index), ignore_index=ignore_index)
