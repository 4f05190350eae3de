"""Pixel weights for the unsupervised loss (Eq. 6).

Each scheme maps the teacher's confidence c and the mask of kept pixels to weights that are zero on
dropped pixels and sum to the number of kept pixels, so the weighted loss of Eq. 7 stays on the scale
of a plain mean.
"""

from __future__ import annotations

import torch


class Uniform:
    """No re-weighting: every kept pixel counts once (Table 4, "GTA without re-weighting")."""

    def __call__(self, confidence: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return keep.to(confidence.dtype)


class Confidence:
    """w = (c + tau) on kept pixels, normalised over the batch (Eq. 6).

    ``tau = 1`` is the paper's Laplace smoothing; ``tau = 0`` weights by confidence alone (Table 9).
    """

    def __init__(self, tau: float = 1.0) -> None:
        if tau < 0:
            raise ValueError(f"reweight.tau must be >= 0, got {tau}")
        self.tau = tau

    def __call__(self, confidence: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        keep = keep.to(confidence.dtype)
        raw = (confidence + self.tau) * keep
        return raw * keep.sum() / raw.sum().clamp_min(torch.finfo(raw.dtype).tiny)
