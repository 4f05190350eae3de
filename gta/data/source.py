"""Dataset sources: where samples live and how their files are read.

A :class:`SegmentationSource` describes one dataset (metadata plus pools of samples); it does not load
anything itself. :class:`SegmentationFiles` turns a list of samples into a torch ``Dataset`` and validates
every file as it is read (:meth:`SegmentationFiles.read`, which ``python -m gta check`` runs over a whole
split), so a broken dataset fails with a :class:`~gta.errors.BadSampleError` naming the file instead of a
cryptic error deep inside the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from gta.contract import IMAGENET_MEAN, IMAGENET_STD
from gta.errors import BadSampleError, ConfigError, DataError, MissingFilesError, MissingPathError

__all__ = [
    "Sample",
    "SegmentationFiles",
    "SegmentationSource",
    "check_files",
    "fixed_labels",
    "read_list",
    "voc_palette",
]


@dataclass(frozen=True)
class Sample:
    """One image and (optionally) its ground-truth mask."""

    id: str  # unique, stable id (used in split files and logs)
    image: Path
    mask: Path | None  # None for images that have no ground truth


def voc_palette(num_colors: int) -> list[list[int]]:
    """The PASCAL VOC bit-interleaved palette: distinct, deterministic colours for any number of classes."""
    palette = []
    for index in range(num_colors):
        rgb = [0, 0, 0]
        code = index
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << bit
            code >>= 3
        palette.append(rgb)
    return palette


def read_list(path: Path) -> list[str]:
    """The entries of a list file: one per line, first column only (so two-column "image mask" lists
    work too), blank lines and repeats dropped."""
    if not path.is_file():
        raise MissingPathError(f"List file {path} does not exist")
    entries = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(entries))


#: missing files a message lists (the error holds all of them)
MISSING_SHOWN = 10


def check_files(samples: Iterable[Sample], listed_in: Path | str) -> list[Sample]:
    """Fail before training starts, naming the samples and where they came from, if files are missing."""
    samples = list(samples)
    missing = [
        (sample.id, what, path)
        for sample in samples
        for what, path in (("image", sample.image), ("mask", sample.mask))
        if path is not None and not path.is_file()
    ]
    if missing:
        lines = [f"Sample '{i}' (from {listed_in}): no {what} file {path}" for i, what, path in missing]
        more = f"\n... and {len(lines) - MISSING_SHOWN} more" if len(lines) > MISSING_SHOWN else ""
        raise MissingFilesError(
            "\n".join(lines[:MISSING_SHOWN]) + more, [(i, path) for i, _, path in missing]
        )
    return samples


def fixed_labels(dataset: str, kwargs: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """Constructor arguments of a dataset whose label set is fixed by its files (VOC, Cityscapes, ...).

    A config may repeat a fixed value (the model reads ``dataset.num_classes``) but not change it."""
    for key, value in fixed.items():
        given = kwargs.get(key)
        if given is not None and _plain(given) != _plain(value):
            raise ConfigError(f"{dataset} has fixed {key}={value}; got {given}")
    return {**kwargs, **fixed}


def _plain(value: Any) -> Any:
    """Config containers (e.g. OmegaConf ListConfig) compared as plain lists."""
    return value if isinstance(value, (int, str)) else [_plain(v) for v in value]


class SegmentationSource:
    """What a dataset config builds: metadata + the three pools of samples.

    Subclasses (VOC, Cityscapes, folder, synthetic) only implement :meth:`pools`, and optionally set
    ``label_lut`` to remap raw mask values (e.g. Cityscapes label ids to train ids).
    """

    label_lut: np.ndarray | None = None  # optional 256-entry uint8 lookup applied to raw mask values on load
    #: the folder of this dataset's published labeled lists in each family (gta/data/splits/<family>/)
    published_lists: str | None = None

    def __init__(
        self,
        root: str | Path,
        num_classes: int,
        ignore_index: int = 255,
        class_names: list[str] | None = None,
        palette: list[list[int]] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_size: int = 513,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip: bool = True,
        pad_label: int | None = None,
        scale_pivot: float | None = None,
    ) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"ignore_index={ignore_index} collides with a class index (0..{num_classes - 1})"
            )
        class_names = (
            list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        )
        if len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class_names given for num_classes={num_classes}")
        palette = [list(c) for c in palette] if palette is not None else voc_palette(num_classes)
        if len(palette) < num_classes or any(len(c) != 3 for c in palette):
            raise ConfigError(f"palette needs {num_classes} RGB triplets, got {palette}")
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ConfigError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        if scale_pivot is not None and not scale_range[0] <= scale_pivot <= scale_range[1]:
            raise ConfigError(f"scale_pivot={scale_pivot} lies outside scale_range {list(scale_range)}")
        if pad_label is not None and not 0 <= pad_label < num_classes:
            raise ConfigError(f"pad_label={pad_label} is not a class index (0..{num_classes - 1})")

        self.root = Path(root).expanduser()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.palette = palette
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.crop_size = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self.pad_label, self.scale_pivot = pad_label, scale_pivot

    def pools(self) -> dict[str, list[Sample]]:
        """``{'labeled': pool labeled subsets are drawn from, 'unlabeled': images that are only ever
        unlabeled (may be empty), 'val': validation samples (with masks)}``"""
        raise NotImplementedError(f"{type(self).__name__} must implement pools()")

    def check_root(self, expected_layout: str, *required: str) -> Path:
        """Return ``root``, or raise a MissingPathError that says what should be there; ``required``
        names paths (relative to root) that must exist too."""
        if not self.root.is_dir():
            raise MissingPathError(
                f"Dataset root {self.root} does not exist (or is not a directory). "
                f"Expected layout:\n{expected_layout}"
            )
        for relative in required:
            if not (self.root / relative).exists():
                raise MissingPathError(
                    f"{self.root / relative} is missing from the dataset at {self.root}. "
                    f"Expected layout:\n{expected_layout}"
                )
        return self.root

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, num_classes={self.num_classes})"


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image, turning every decoder failure (and a file that has gone) into a
    BadSampleError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports corrupt data with all three
        raise BadSampleError(f"Cannot read {what} file {path}: {err}", path, f"unreadable {what}") from err


class SegmentationFiles(Dataset):
    """Loads ``(image, mask)`` pairs from disk, validates them and applies a joint transform.

    Returns a float image tensor ``3xHxW`` and an int64 mask ``HxW``. With ``with_mask=False`` (unlabeled
    use) the ground truth is never read: the mask is all zeros, so after the transform the only
    ``ignore_index`` pixels are crop padding, which tells the method which pixels are not real. A sample
    whose files cannot be used raises :class:`~gta.errors.BadSampleError` naming the file.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        num_classes: int,
        ignore_index: int,
        label_lut: np.ndarray | None = None,
        with_mask: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.with_mask = with_mask
        if label_lut is not None:
            label_lut = np.asarray(label_lut)
            if label_lut.shape != (256,) or not np.array_equal(label_lut, label_lut.astype(np.uint8)):
                raise ValueError("label_lut must be 256 values in 0..255 (one per raw mask value)")
            label_lut = label_lut.astype(np.uint8)
        self.label_lut = label_lut
        if with_mask:
            missing = [s.id for s in self.samples if s.mask is None]
            if missing:
                raise DataError(f"{len(missing)} samples have no mask but masks are required: {missing[:5]}")
        # Everything outside [0, num_classes) except ignore_index is an invalid raw label.
        self._invalid = np.ones(256, dtype=bool)
        self._invalid[:num_classes] = False
        if 0 <= ignore_index < 256:
            self._invalid[ignore_index] = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        """``(image, mask)``, followed by further views of the image when the transform makes them
        (``gta.data.transforms.WithViews``)."""
        image, mask = self.read(index)
        if mask is None:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
        image = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        image, mask, *views = self.transform(image, tv_tensors.Mask(torch.from_numpy(mask)))
        # Plain tensors downstream: tv_tensor subclasses only matter to the transforms.
        plain = [image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()]
        return tuple(plain + [view.as_subclass(torch.Tensor) for view in views])

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample ``index`` as read and checked, before any transform: the RGB image (``HxWx3`` uint8) and
        its class-index mask (``HxW`` uint8, mapped by ``label_lut``; None with ``with_mask=False``)."""
        sample = self.samples[index]
        image = _open(sample.image, "image").convert("RGB")
        mask = self._load_mask(sample, image.size) if self.with_mask else None
        return np.array(image), mask

    def _load_mask(self, sample: Sample, image_size: tuple[int, int]) -> np.ndarray:
        mask = _open(sample.mask, "mask")
        if mask.mode not in ("L", "P"):
            raise BadSampleError(
                f"Mask {sample.mask} has mode {mask.mode!r}; expected a single-channel class-index PNG "
                "(mode 'L' or 'P')", sample.mask, "mask not single-channel",
            )  # fmt: skip
        if mask.size != image_size:
            raise BadSampleError(
                f"Mask {sample.mask} is {mask.size[0]}x{mask.size[1]} but image {sample.image} is "
                f"{image_size[0]}x{image_size[1]}", sample.mask, "mask size differs from image",
            )  # fmt: skip
        values = np.array(mask, dtype=np.uint8)  # mode P reads as palette indices, i.e. class ids
        # Validate the raw values (what is in the file) so the message names a value the user can find.
        invalid = self._invalid if self.label_lut is None else self._invalid[self.label_lut]
        present = np.bincount(values.ravel(), minlength=256) > 0
        bad = np.flatnonzero(present & invalid)
        if bad.size:
            mapped = "" if self.label_lut is None else " after mapping by the dataset's label table"
            raise BadSampleError(
                f"Mask {sample.mask} contains values {bad.tolist()} outside the accepted range "
                f"[0, {self.num_classes}) + ignore_index {self.ignore_index}{mapped}", sample.mask,
                "labels outside the classes",
            )  # fmt: skip
        return values if self.label_lut is None else self.label_lut[values]
