"""The ``check`` command: read every file a run would train and validate on, before training on it.

``python -m gta check`` takes the overrides of ``train`` (it composes the same config) and selects the same
split, with the start-up checks ``train`` runs (dataset root, lists, files that do not exist). It then
reads every image and mask of the labeled, unlabeled (images only: training never reads their masks) and
validation sets in parallel worker processes, checking each as training checks a sample it loads
(:meth:`gta.data.SegmentationFiles.read`). It prints the labeled set's pixel share per class, and a table
of the problems found: unreadable files, masks of another size than their image, labels outside the
classes, listed samples without files. The exit status is 1 when there is any problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gta.data import SegmentationFiles, SegmentationSource, select_split
from gta.errors import BadSampleError, DataError, MissingFilesError


@dataclass(frozen=True)
class Problem:
    set: str  # labeled, unlabeled, val; "listed" for a file that does not exist
    sample: str
    problem: str
    detail: str


class _Reads(Dataset):
    """Every sample of ``sets`` in turn, as (its problem or None, the 256-bin histogram of its mask's values
    for a usable labeled sample, else None)."""

    def __init__(self, sets: dict[str, SegmentationFiles]) -> None:
        self.sets = sets
        self.items = [(name, i) for name, files in sets.items() for i in range(len(files))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[Problem | None, np.ndarray | None]:
        name, i = self.items[k]
        files = self.sets[name]
        try:
            _, mask = files.read(i)
        except BadSampleError as error:
            return Problem(name, files.samples[i].id, error.problem, str(error)), None
        return None, np.bincount(mask.ravel(), minlength=256) if name == "labeled" else None


def _as_read(item):
    return item


def read_all(sets: dict[str, SegmentationFiles], workers: int) -> tuple[list[Problem], np.ndarray]:
    """The problems of the samples of ``sets`` (in their order), and the labeled masks' summed histogram;
    read in ``workers`` processes, with a progress bar on a terminal."""
    reads = _Reads(sets)
    loader = DataLoader(reads, batch_size=None, num_workers=min(workers, len(reads)), collate_fn=_as_read)
    problems, counts = [], np.zeros(256, dtype=np.int64)
    for problem, histogram in tqdm(loader, total=len(reads), desc="check", unit="sample", disable=None):
        if problem is not None:
            problems.append(problem)
        elif histogram is not None:
            counts += histogram
    return problems, counts


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def class_shares(source: SegmentationSource, counts: np.ndarray, samples: int) -> str:
    """The labeled masks' pixels per class, and how many more are ignored."""
    labeled = int(counts[: source.num_classes].sum())
    ignored = int(counts[source.ignore_index]) if 0 <= source.ignore_index < 256 else 0
    rows = [["class", "pixels", "share"]] + [
        [name, str(counts[c]), f"{counts[c] / max(labeled, 1):.2%}"] for c, name in enumerate(source.class_names)
    ]
    ignore = f"{ignored / max(labeled + ignored, 1):.2%} of all pixels are ignore_index {source.ignore_index}"
    return f"pixels of the {samples} labeled samples by class ({ignore}):\n" + table(rows)


def report_problems(problems: list[Problem]) -> str:
    rows = [["set", "sample", "problem", "detail"]] + [[p.set, p.sample, p.problem, p.detail] for p in problems]
    return table(rows)


def run(cfg: DictConfig) -> int:
    source = instantiate(cfg.dataset)
    try:
        split = select_split(source, cfg.split, cfg.data.split_seed, cfg.data.split_dir, cfg.data.splits)
    except MissingFilesError as error:
        print(report_problems([Problem("listed", i, "file missing", str(path)) for i, path in error.missing]))
        raise DataError(
            f"{len(error.missing)} listed files of the dataset at {source.root} do not exist (table above); the "
            "other files were not read: run the check again once these are there"
        ) from None
    sets = {
        "labeled": SegmentationFiles(split.labeled, None, source.num_classes, source.ignore_index, source.label_lut),
        "unlabeled": SegmentationFiles(
            split.unlabeled, None, source.num_classes, source.ignore_index, source.label_lut, with_mask=False
        ),
        "val": SegmentationFiles(split.val, None, source.num_classes, source.ignore_index, source.label_lut),
    }
    problems, counts = read_all(sets, workers=len(os.sched_getaffinity(0)))
    print(
        f"{type(source).__name__} at {source.root}: read {len(split.labeled)} labeled, {len(split.unlabeled)} "
        f"unlabeled (images only) and {len(split.val)} validation samples"
    )
    print(class_shares(source, counts, len(split.labeled) - sum(p.set == "labeled" for p in problems)))
    if problems:
        total = len(split.labeled) + len(split.unlabeled) + len(split.val)
        print(f"\nproblems:\n{report_problems(problems)}")
        raise DataError(
            f"{len(problems)} of the {total} samples of the dataset at {source.root} cannot be used (table above): "
            "fix or remove them (training skips such samples with data.on_bad_sample=skip, the default)"
        )
    print("no problems found")
    return 0
