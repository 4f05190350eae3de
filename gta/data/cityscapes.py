"""Cityscapes (fine annotations): 2975 training images form the labeled pool, 500 validate.

Files are enumerated with torchvision's ``Cityscapes`` reader and labels follow its class table (the
official ``cityscapesScripts`` one): the 34 label ids map to the 19 train ids, everything else to ignore.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import Cityscapes as TorchvisionCityscapes

from gta.errors import ConfigError, MissingPathError

from .source import Sample, SegmentationSource, check_files, fixed_labels

__all__ = ["CITYSCAPES_CLASSES", "Cityscapes"]

IGNORE = 255
_TRAIN_CLASSES = sorted(
    (c for c in TorchvisionCityscapes.classes if 0 <= c.train_id < IGNORE), key=lambda c: c.train_id
)
CITYSCAPES_CLASSES = tuple(c.name for c in _TRAIN_CLASSES)
CITYSCAPES_PALETTE = [list(c.color) for c in _TRAIN_CLASSES]

IMAGE_SUFFIX, LABEL_IDS, TRAIN_IDS = "_leftImg8bit.png", "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"
LABEL_FILES = ("auto", "labelIds", "labelTrainIds")
SPLITS = {"labeled": "train", "val": "val"}

LAYOUT = f"""\
  <root>/leftImg8bit/{{train,val}}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX}
  <root>/gtFine/{{train,val}}/<city>/<city>_<seq>_<frame>{LABEL_IDS}
  and/or <city>_<seq>_<frame>{TRAIN_IDS} (written by cityscapesScripts' createTrainIdLabelImgs)
(set dataset.root or GTA_CITYSCAPES_ROOT)"""


def label_id_table(ignore_index: int = IGNORE) -> np.ndarray:
    """Raw ``labelIds`` value -> train id (or ``ignore_index``). Values the table does not know map to
    themselves, so mask validation still reports them."""
    lut = np.arange(256, dtype=np.uint8)
    for c in TorchvisionCityscapes.classes:
        if c.id >= 0:
            lut[c.id] = c.train_id if 0 <= c.train_id < IGNORE else ignore_index
    return lut


class Cityscapes(SegmentationSource):
    """``label_files``: "labelTrainIds" reads prepared train-id masks, "labelIds" maps the raw label ids,
    "auto" reads train-id masks when every image has one."""

    published_lists = "cityscapes"

    def __init__(self, root: str | Path, label_files: str = "auto", **kwargs) -> None:
        if label_files not in LABEL_FILES:
            raise ConfigError(f"dataset.label_files must be one of {LABEL_FILES}, got '{label_files}'")
        if kwargs.get("palette") is None:
            kwargs["palette"] = CITYSCAPES_PALETTE
        kwargs = fixed_labels(
            type(self).__name__, kwargs, num_classes=len(CITYSCAPES_CLASSES),
            class_names=list(CITYSCAPES_CLASSES), ignore_index=IGNORE,
        )  # fmt: skip
        super().__init__(root, **kwargs)
        self.label_files = label_files
        self._pools: dict[str, list[Sample]] | None = None
        self._train_ids = False

    def pools(self) -> dict[str, list[Sample]]:
        if self._pools is None:
            dirs = [f"{kind}/{split}" for kind in ("leftImg8bit", "gtFine") for split in SPLITS.values()]
            self.check_root(LAYOUT, *dirs)
            found = {pool: self._scan(split) for pool, split in SPLITS.items()}
            everything = [s for samples in found.values() for s in samples]
            self._train_ids = self.label_files == "labelTrainIds" or (
                self.label_files == "auto" and all(_train_id_file(s.mask).is_file() for s in everything)
            )
            if self._train_ids:
                found = {
                    pool: [Sample(s.id, s.image, _train_id_file(s.mask)) for s in samples]
                    for pool, samples in found.items()
                }
            pools = {pool: check_files(found[pool], self.root / "gtFine" / s) for pool, s in SPLITS.items()}
            self._pools = {"labeled": pools["labeled"], "unlabeled": [], "val": pools["val"]}
        return self._pools

    @property
    def label_lut(self) -> np.ndarray | None:  # type: ignore[override]
        """The label-id table, unless the masks already hold train ids."""
        self.pools()
        return None if self._train_ids else label_id_table(self.ignore_index)

    def _scan(self, split: str) -> list[Sample]:
        reader = TorchvisionCityscapes(str(self.root), split=split, mode="fine", target_type="semantic")
        samples = [
            Sample(Path(image).name.removesuffix(IMAGE_SUFFIX), Path(image), Path(target))
            for image, (target,) in zip(reader.images, reader.targets, strict=True)
            if image.endswith(IMAGE_SUFFIX)
        ]
        if not samples:
            where = self.root / "leftImg8bit" / split
            raise MissingPathError(f"No *{IMAGE_SUFFIX} images under {where}. Expected layout:\n{LAYOUT}")
        return samples


def _train_id_file(label_ids: Path) -> Path:
    return label_ids.with_name(label_ids.name.removesuffix(LABEL_IDS) + TRAIN_IDS)
