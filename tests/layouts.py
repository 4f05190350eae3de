"""Tiny datasets written in the real on-disk layouts (VOC + SBD, Cityscapes, a plain folder).

Images are a few dozen pixels; each writer returns what the tests need to know about what it wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gta.data import voc_palette

VOC_TRAIN = [f"2007_{i:06d}" for i in range(6)]  # the "1464" fine train images
VOC_VAL = [f"2008_{i:06d}" for i in range(3)]  # the "1449" val images
VOC_SBD_ONLY = [f"2010_{i:06d}" for i in range(5)]  # augmented set beyond the fine train images

# Cityscapes label ids -> train ids: road 7 -> 0, building 11 -> 1 ... (the official table); ids 0, 1, 9
# (unlabeled, ego vehicle, parking) are not trained on and map to ignore.
CITYSCAPES_IDS = {7: 0, 11: 2, 26: 13, 33: 18, 0: 255, 1: 255, 9: 255}
CITYSCAPES_TRAIN = {
    "aachen": ["aachen_000000_000019", "aachen_000001_000019"],
    "bremen": ["bremen_000000_000019"],
}
CITYSCAPES_VAL = {"lindau": ["lindau_000000_000019", "lindau_000001_000019"]}

def save_image(path: Path, height: int, width: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def save_mask(path: Path, values: np.ndarray, palette: list[list[int]] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(values.astype(np.uint8))
    if palette is not None:
        mask.putpalette([v for colour in palette for v in colour])
    mask.save(path)
    return path


def class_blocks(height: int, width: int, classes: list[int], seed: int) -> np.ndarray:
    """Vertical bands of the given classes, in a seed-dependent order."""
    order = np.random.default_rng(seed).permutation(classes)
    return np.array(order)[np.arange(width) * len(order) // width][None, :].repeat(height, 0)


def write_voc(
    root: Path, train_aug_list: bool = True, size: tuple[int, int] = (40, 50), train: list[str] = VOC_TRAIN
) -> Path:
    """VOCdevkit/VOC2012 with SBD: fine palette masks with 255 object borders, grayscale aug masks;
    ``train`` are the ids of the fine train images."""
    palette = voc_palette(256)
    h, w = size
    every = train + VOC_VAL + VOC_SBD_ONLY
    for n, sample_id in enumerate(every):
        save_image(root / "JPEGImages" / f"{sample_id}.jpg", h + n % 3, w, seed=n)
        labels = class_blocks(h + n % 3, w, [0, 1 + n % 20, 15], seed=n)
        if sample_id not in VOC_SBD_ONLY:
            fine = labels.copy()
            fine[:, 1:-1][np.diff(labels, axis=1)[:, 1:] != 0] = 255  # object borders
            fine[0, :] = 255
            save_mask(root / "SegmentationClass" / f"{sample_id}.png", fine, palette)
        if sample_id not in VOC_VAL:
            save_mask(root / "SegmentationClassAug" / f"{sample_id}.png", labels)
    # SBD also annotates val images; those masks exist in SegmentationClassAug and must stay out of training.
    for sample_id in VOC_VAL:
        save_mask(root / "SegmentationClassAug" / f"{sample_id}.png", np.zeros((h, w)))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in VOC_VAL))
    if train_aug_list:  # the common two-column form
        aug = train + VOC_SBD_ONLY
        lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in aug]
        (lists / "train_aug.txt").write_text("".join(lines))
    return root


def write_cityscapes(
    root: Path, label_ids: bool = True, train_ids: bool = False, train: dict[str, list[str]] = CITYSCAPES_TRAIN
) -> dict[str, np.ndarray]:
    """leftImg8bit + gtFine, ``train`` the training images by city; returns the expected train-id mask of
    every sample."""
    expected = {}
    raw_ids = list(CITYSCAPES_IDS)
    for split, cities in (("train", train), ("val", CITYSCAPES_VAL)):
        for city, names in cities.items():
            for name in names:
                n = len(expected)
                image = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
                save_image(image, 33, 64, seed=100 + n)
                raw = class_blocks(33, 64, raw_ids, seed=n)
                mapped = np.vectorize(CITYSCAPES_IDS.get)(raw)
                gt = root / "gtFine" / split / city
                if label_ids:
                    save_mask(gt / f"{name}_gtFine_labelIds.png", raw)
                if train_ids:
                    save_mask(gt / f"{name}_gtFine_labelTrainIds.png", mapped)
                expected[name] = mapped
    return expected


def write_folder(root: Path, num_classes: int = 3) -> Path:
    """images/{train,val,unlabeled}/ with masks/{train,val}/ at odd sizes, plus list files."""
    sizes = [(37, 53), (41, 29), (33, 47)]
    for k, (split, count) in enumerate((("train", 5), ("val", 2), ("unlabeled", 3))):
        for i in range(count):
            h, w = sizes[i % len(sizes)]
            save_image(root / "images" / split / f"img_{i}.jpg", h, w, seed=100 * k + i)
            if split != "unlabeled":
                values = class_blocks(h, w, list(range(num_classes)), seed=i)
                values[-1, :] = 255
                save_mask(root / "masks" / split / f"img_{i}.png", values)
    (root / "lists").mkdir(exist_ok=True)
    (root / "lists" / "train.txt").write_text("train/img_0\nimages/train/img_1.jpg\ntrain/img_2.jpg\n")
    (root / "lists" / "val.txt").write_text("val/img_0\nval/img_1\n")
    return root
