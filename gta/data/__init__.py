"""Datasets, augmentation, sampling and loaders."""

from .build import Loaders, SplitData, build_loaders, select_split, write_split
from .sampler import EpochSampler, derive_seed
from .source import Sample, SegmentationFiles, SegmentationSource, voc_palette
from .synthetic import SyntheticShapes, render_scene
from .transforms import RandomRescale, eval_transform, train_transform

__all__ = [
    "EpochSampler",
    "Loaders",
    "RandomRescale",
    "Sample",
    "SegmentationFiles",
    "SegmentationSource",
    "SplitData",
    "SyntheticShapes",
    "build_loaders",
    "derive_seed",
    "eval_transform",
    "render_scene",
    "select_split",
    "train_transform",
    "voc_palette",
    "write_split",
]
