"""PASCAL VOC 2012 with the SBD augmentation: the original and the augmented protocol (docs/algorithm.md §6).

torchvision's ``VOCSegmentation`` is not used: it insists on ``<root>/VOCdevkit/VOC2012`` and knows
neither ``SegmentationClassAug`` nor the 10582-image ``train_aug`` set, which both protocols need.
"""

from __future__ import annotations

from pathlib import Path

from gta.errors import MissingPathError

from .source import Sample, SegmentationSource, check_files, fixed_labels, read_list

__all__ = ["VOC_CLASSES", "PascalVOC", "PascalVOCAug"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

IMAGES, FINE, AUG, LISTS = "JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"

LAYOUT = f"""\
  <root>/{IMAGES}/<id>.jpg
  <root>/{FINE}/<id>.png        fine masks (palette PNGs, 255 = object borders)
  <root>/{AUG}/<id>.png     SBD-augmented masks of the 10582 training images
  <root>/{LISTS}/train.txt, val.txt   (1464 and 1449 ids)
  <root>/{LISTS}/train_aug.txt        optional: the 10582 ids (default: every {AUG} mask not in val)
with <root> = .../VOCdevkit/VOC2012 (set dataset.root or GTA_VOC_ROOT)"""


class PascalVOC(SegmentationSource):
    """Original protocol: labeled subsets of the 1464 fine train images; the rest of the 10582-image
    augmented set is unlabeled; the 1449 val images are the validation set."""

    published_lists = "pascal_voc"

    def __init__(self, root: str | Path, **kwargs) -> None:
        kwargs = fixed_labels(
            type(self).__name__, kwargs, num_classes=len(VOC_CLASSES), class_names=list(VOC_CLASSES),
            ignore_index=255,  # the object borders of the fine masks
        )  # fmt: skip
        super().__init__(root, **kwargs)

    def pools(self) -> dict[str, list[Sample]]:
        self.check_root(LAYOUT, IMAGES, FINE, LISTS)
        train, val = self.listed("train", FINE), self.listed("val", FINE)
        fine = {s.id for s in train}
        # Unlabeled images carry their augmented mask when there is one, so a split file may still
        # name them as labeled.
        unlabeled = [s for s in self.augmented(exclude={s.id for s in val}) if s.id not in fine]
        return {"labeled": train, "unlabeled": unlabeled, "val": val}

    def sample(self, sample_id: str, mask_dir: str | None) -> Sample:
        mask = None if mask_dir is None else self.root / mask_dir / f"{sample_id}.png"
        return Sample(sample_id, self.root / IMAGES / f"{sample_id}.jpg", mask)

    def listed(self, name: str, mask_dir: str) -> list[Sample]:
        """The samples of ``ImageSets/Segmentation/<name>.txt`` (ids, or paths whose stem is the id)."""
        path = self.root / LISTS / f"{name}.txt"
        self.check_root(LAYOUT, f"{LISTS}/{name}.txt")
        return check_files((self.sample(Path(e).stem, mask_dir) for e in read_list(path)), path)

    def augmented(self, exclude: set[str]) -> list[Sample]:
        """The augmented training set (10582 images with the usual files), minus ``exclude``."""
        listed, masks = self.root / LISTS / "train_aug.txt", self.root / AUG
        if listed.is_file():
            ids, origin = [Path(e).stem for e in read_list(listed)], listed
        elif masks.is_dir():
            ids, origin = sorted(p.stem for p in masks.glob("*.png")), masks
        else:
            raise MissingPathError(
                f"The augmented VOC training set (SBD) is missing from {self.root}: neither {listed} nor "
                f"{masks} exists. Both VOC protocols draw their unlabeled images from it. Expected "
                f"layout:\n{LAYOUT}"
            )
        mask_dir = AUG if masks.is_dir() else None
        return check_files((self.sample(i, mask_dir) for i in ids if i not in exclude), origin)


class PascalVOCAug(PascalVOC):
    """Augmented protocol: labeled subsets of all 10582 augmented training images (their
    ``SegmentationClassAug`` masks); validation as in the original protocol."""

    published_lists = "pascal_voc_aug"

    def pools(self) -> dict[str, list[Sample]]:
        self.check_root(LAYOUT, IMAGES, AUG, LISTS)
        val = self.listed("val", FINE)
        return {"labeled": self.augmented(exclude={s.id for s in val}), "unlabeled": [], "val": val}
