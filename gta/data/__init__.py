"""Datasets, augmentation, sampling and loaders."""

from .build import (
    FAMILIES,
    LISTS_DIR,
    Loaders,
    SplitData,
    build_loaders,
    build_val_loader,
    crop_warning,
    published_list,
    select_split,
    split_params,
    write_split,
)
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
    "FAMILIES",
    "LISTS_DIR",
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
    "crop_warning",
    "derive_seed",
    "eval_transform",
    "fixed_labels",
    "published_list",
    "read_list",
    "render_scene",
    "select_split",
    "split_params",
    "train_transform",
    "voc_palette",
    "write_split",
]
