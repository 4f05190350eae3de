"""Datasets, augmentation, sampling and loaders."""

from .build import Loaders, SplitData, build_loaders, build_val_loader, select_split, write_split
from .cityscapes import CITYSCAPES_CLASSES, Cityscapes
from .folder import SegmentationFolder
from .sampler import EpochSampler, derive_seed
from .source import (
    Sample,
    SegmentationFiles,
    SegmentationSource,
    check_files,
    fixed_labels,
    read_list,
    voc_palette,
)
from .synthetic import SyntheticShapes, render_scene
from .transforms import RandomRescale, eval_transform, train_transform
from .voc import VOC_CLASSES, PascalVOC, PascalVOCAug

__all__ = [
    "CITYSCAPES_CLASSES",
    "Cityscapes",
    "EpochSampler",
    "Loaders",
    "PascalVOC",
    "PascalVOCAug",
    "RandomRescale",
    "Sample",
    "SegmentationFiles",
    "SegmentationFolder",
    "SegmentationSource",
    "SplitData",
    "SyntheticShapes",
    "VOC_CLASSES",
    "build_loaders",
    "build_val_loader",
    "check_files",
    "derive_seed",
    "eval_transform",
    "fixed_labels",
    "read_list",
    "render_scene",
    "select_split",
    "train_transform",
    "voc_palette",
    "write_split",
]
