"""Joint image/mask augmentation built on ``torchvision.transforms.v2``.

Images are ``tv_tensors.Image`` and masks ``tv_tensors.Mask``, so every geometric transform is applied to
both with the right interpolation and fill, and the randomness (drawn from torch's RNG) is shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from gta.errors import ConfigError

__all__ = ["RandomRescale", "WithViews", "eval_transform", "photometric_view", "train_transform"]


class RandomRescale(v2.Transform):
    """Rescale image and mask by one factor drawn uniformly from ``scale_range``.

    With ``pivot`` (inside the range), half of the factors are drawn uniformly from [low, pivot) and half
    from [pivot, high): the released GTA-Seg code's rescale (docs/algorithm.md §5.10), which for (0.5, 2.0) and
    pivot 1 shrinks as often as it enlarges.

    Images use bilinear (antialiased) interpolation and masks nearest-exact, which samples at the same
    pixel centres as bilinear does, so labels stay aligned with the image. (Plain "nearest" is shifted by
    up to half a pixel.)
    """

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0), pivot: float | None = None) -> None:
        super().__init__()
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ConfigError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        if pivot is not None and not low <= pivot <= high:
            raise ConfigError(f"scale_pivot={pivot} lies outside scale_range [{low}, {high}]")
        self.scale_range, self.pivot = (low, high), pivot

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        if self.pivot is not None:
            low, high = (low, self.pivot) if torch.rand(()).item() < 0.5 else (self.pivot, high)
        factor = low + (high - low) * torch.rand(()).item()
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, params["size"], interpolation=InterpolationMode.NEAREST_EXACT)
        return F.resize(inpt, params["size"], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _to_float_and_normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        # Only images are scaled to [0, 1]; masks keep their class ids and become int64.
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def train_transform(
    crop_size: int | Sequence[int],
    scale_range: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    ignore_index: int,
    flip: bool = True,
    pad_label: int | None = None,
    scale_pivot: float | None = None,
) -> v2.Compose:
    """Random rescale, horizontal flip and a ``crop_size`` crop; images smaller than the crop are padded
    with black pixels labelled ``ignore_index`` so the padding never counts as a class (``pad_label``
    labels them with that class instead, as the released code does with background: docs/algorithm.md §5.8)."""
    geometric = v2.Compose(_geometric(crop_size, scale_range, ignore_index, flip, pad_label, scale_pivot))
    return v2.Compose([geometric, v2.Compose(_to_float_and_normalize(mean, std))])  # the two parts WithViews uses


def _geometric(
    crop_size: int | Sequence[int],
    scale_range: Sequence[float],
    ignore_index: int,
    flip: bool,
    pad_label: int | None,
    scale_pivot: float | None,
) -> list[v2.Transform]:
    steps: list[v2.Transform] = [RandomRescale(scale_range, scale_pivot)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    fill = ignore_index if pad_label is None else pad_label
    steps.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: fill}))
    return steps


class WithViews:
    """The weak view of an unlabeled image (:func:`train_transform`) and further named views of the same
    crop: each is the crop before normalisation through the view's own pipeline, then normalised.

    Called on ``(image, mask)``, returns ``(weak, mask, *views)`` in the order of ``views``. The weak view
    draws exactly the random numbers :func:`train_transform` draws; the views draw theirs after it.
    """

    def __init__(self, views: dict[str, Callable[[tv_tensors.Image], tv_tensors.Image]], weak: v2.Compose) -> None:
        """``weak``: what :func:`train_transform` built, its geometric steps and then its normalisation."""
        self.views = dict(views)
        self.geometric, self.normalize = weak.transforms

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple:
        image, mask = self.geometric(image, mask)
        weak, mask = self.normalize(image, mask)
        # a view may be any function of the image tensor: its output is an image again for normalising
        return (weak, mask, *(self.normalize(tv_tensors.Image(view(image))) for view in self.views.values()))


def photometric_view(
    jitter: Sequence[float],
    jitter_prob: float,
    grayscale_prob: float,
    blur_prob: float,
    blur_sigma: Sequence[float],
) -> v2.Compose:
    """A view that changes colours, not geometry (a "strong" view): with probability ``jitter_prob`` a
    colour jitter of ``jitter`` = (brightness, contrast, saturation, hue), then grayscale with
    ``grayscale_prob``, then with ``blur_prob`` a Gaussian blur of a standard deviation drawn uniformly
    from ``blur_sigma`` (the kernel spans three of the largest on each side)."""
    if len(jitter) != 4 or len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
        raise ConfigError(
            f"a view needs jitter = [brightness, contrast, saturation, hue] and blur_sigma = [low, high] with "
            f"0 < low <= high; got jitter={list(jitter)}, blur_sigma={list(blur_sigma)}"
        )
    for name, p in (("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob), ("blur_prob", blur_prob)):
        if not 0 <= p <= 1:
            raise ConfigError(f"a view's {name} must lie in [0, 1], got {p}")
    brightness, contrast, saturation, hue = (float(v) for v in jitter)
    kernel = 2 * math.ceil(3 * blur_sigma[1]) + 1
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_prob),
        v2.RandomGrayscale(p=grayscale_prob),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(float(blur_sigma[0]), float(blur_sigma[1])))], p=blur_prob),
    ])


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """No geometric change (evaluation is on full images): dtype conversion and normalisation only."""
    return v2.Compose(_to_float_and_normalize(mean, std))
