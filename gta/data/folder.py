"""Any segmentation data: a folder of images and a folder of class-index masks with the same names."""

from __future__ import annotations

from pathlib import Path

from gta.errors import MissingPathError

from .source import Sample, SegmentationSource, check_files, read_list

__all__ = ["SegmentationFolder"]


class SegmentationFolder(SegmentationSource):
    """Images ``<root>/<image_dir>/<id><image_suffix>`` with masks ``<root>/<mask_dir>/<id><mask_suffix>``
    (single-channel PNGs of class ids, or palette PNGs whose indices are the class ids).

    ``train``, ``val`` and ``unlabeled`` each name either a sub-folder of ``image_dir`` (and ``mask_dir``;
    "." for all of it) or a list file ending in ``.txt`` (relative to root) with one id or image path
    per line. ``train`` is the labeled pool split=N draws from; ``unlabeled`` (optional) holds images
    that have no masks.
    """

    def __init__(
        self,
        root: str | Path,
        num_classes: int,
        image_dir: str = "images",
        mask_dir: str = "masks",
        image_suffix: str = ".jpg",
        mask_suffix: str = ".png",
        train: str = "train",
        val: str = "val",
        unlabeled: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(root, num_classes, **kwargs)
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self.members = {"labeled": train, "val": val, "unlabeled": unlabeled}

    @property
    def layout(self) -> str:
        image = f"<root>/{self.image_dir}/<id>{self.image_suffix}"
        mask = f"<root>/{self.mask_dir}/<id>{self.mask_suffix}"
        return (
            f"  {image}\n  {mask}   (class ids 0..{self.num_classes - 1}, {self.ignore_index} = ignore)\n"
            f"with train={self.members['labeled']!r}, val={self.members['val']!r} and "
            f"unlabeled={self.members['unlabeled']!r} each a sub-folder of both, or a list file (*.txt) "
            "under <root>"
        )

    def pools(self) -> dict[str, list[Sample]]:
        self.check_root(self.layout)
        return {
            pool: self._collect(where, with_masks=pool != "unlabeled") if where else []
            for pool, where in self.members.items()
        }

    def _collect(self, where: str, with_masks: bool) -> list[Sample]:
        images, masks = self.root / self.image_dir, self.root / self.mask_dir
        if where.endswith(".txt"):
            origin = self.root / where
            ids = [self._id(entry) for entry in read_list(origin)]
        else:
            origin = images / where
            if not origin.is_dir():
                raise MissingPathError(f"{origin} is not a directory. Expected layout:\n{self.layout}")
            files = (p for p in origin.rglob(f"*{self.image_suffix}") if p.is_file())
            ids = sorted(p.relative_to(images).as_posix().removesuffix(self.image_suffix) for p in files)
            if not ids:
                raise MissingPathError(
                    f"No *{self.image_suffix} images under {origin} (set dataset.image_suffix). "
                    f"Expected layout:\n{self.layout}"
                )
        mask = (lambda i: masks / f"{i}{self.mask_suffix}") if with_masks else (lambda i: None)
        return check_files((Sample(i, images / f"{i}{self.image_suffix}", mask(i)) for i in ids), origin)

    def _id(self, entry: str) -> str:
        """A list entry as an id: ``<id>``, ``<id><image_suffix>`` or ``<image_dir>/<id><image_suffix>``."""
        entry = entry.removeprefix("./").removeprefix(f"{self.image_dir.strip('/')}/")
        return entry.removesuffix(self.image_suffix)
