"""CutMix for the unlabeled batch, applied identically to images, pseudo-labels and confidences."""

from __future__ import annotations

import math

import torch


def cutmix(tensors: list[torch.Tensor], prob: float, area: float = 0.5) -> list[torch.Tensor]:
    """Paste a random box covering ``area`` of each image from a partner image of the same batch.

    Every tensor is (B, ..., H, W) and receives the same boxes from the same partners, so an image and
    the targets made for it stay aligned. Each sample is mixed with probability ``prob``; the partner
    of sample i is sample i+1 (cyclically), which never pairs an image with itself when B > 1.
    """
    b, (h, w) = tensors[0].shape[0], tensors[0].shape[-2:]
    if prob <= 0 or b < 2:
        return tensors
    device = tensors[0].device
    mixed = torch.rand(b, device=device) < prob
    side = math.sqrt(area)
    bh, bw = round(h * side), round(w * side)
    top = torch.randint(0, h - bh + 1, (b,), device=device)
    left = torch.randint(0, w - bw + 1, (b,), device=device)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    box = (
        (rows >= top.view(b, 1, 1))
        & (rows < (top + bh).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1))
        & (cols < (left + bw).view(b, 1, 1))
        & mixed.view(b, 1, 1)
    )
    out = []
    for t in tensors:
        partner = t.roll(shifts=-1, dims=0)
        m = box.view(b, *([1] * (t.dim() - 3)), h, w)
        out.append(torch.where(m, partner, t))
    return out
