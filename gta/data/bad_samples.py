"""What the loaders do with a sample whose files cannot be used (``data.on_bad_sample``).

A corrupt image, a mask of the wrong size or a label outside the classes is found when the sample is
loaded, perhaps hours into a run, in a loader worker. The worker does not raise (its exception would
reach the main process wrapped in the worker's traceback): a training item is drawn instead from the next
usable sample of the set, a validation item is left out, and the batch carries ``(file, message)`` of
each such sample to the main process, where :class:`BadSamples` applies the policy:

- ``skip`` (default): warn once per file and keep it for the trainer, which records it in
  ``<run dir>/bad_samples.jsonl`` and as the ``data/bad_samples`` metric. Training batches stay full and
  each replacement depends only on the sample's place in the epoch, so a resumed run stays exact.
- ``stop``: fail with the message naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from torch.utils.data import DataLoader, Dataset

from gta.errors import BadSampleError, ConfigError, DataError

__all__ = ["ON_BAD_SAMPLE", "BadSamples", "Guarded", "ReportingLoader"]

ON_BAD_SAMPLE = ("skip", "stop")

#: a bad sample as it travels from a worker: (file, message)
Bad = tuple[str, str]


class BadSamples:
    """The main process's side of ``data.on_bad_sample``, shared by a run's loaders."""

    def __init__(self, policy: str = "skip") -> None:
        if policy not in ON_BAD_SAMPLE:
            raise ConfigError(f"data.on_bad_sample must be one of {ON_BAD_SAMPLE}, got '{policy}'")
        self.policy = policy
        self.seen: set[str] = set()  # files warned about
        self._new: list[Bad] = []

    def report(self, bad: list[Bad]) -> None:
        for path, message in bad:
            if self.policy == "stop":
                raise BadSampleError(
                    f"{message} (data.on_bad_sample=stop; skip would leave the sample out, and "
                    "python -m gta check lists every such file)", path,
                )  # fmt: skip
            if path not in self.seen:
                self.seen.add(path)
                self._new.append((path, message))
                warnings.warn(f"{message}; the sample is skipped (data.on_bad_sample=skip)", RuntimeWarning, 2)

    def take(self) -> list[Bad]:
        """The files skipped since the last call, each once."""
        new, self._new = self._new, []
        return new


def _bad_of(error: BadSampleError) -> Bad:
    return str(error.path), str(error)


class Guarded(Dataset):
    """``(item, [])``, or ``(None, [(file, message)])`` for a sample whose files cannot be used."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, list[Bad]]:
        try:
            return self.dataset[index], []
        except BadSampleError as error:
            return None, [_bad_of(error)]


def replacing(load: Callable[[int], Any], index: int, size: int) -> tuple[Any, list[Bad]]:
    """``(load(index), [])``, else the first usable sample after ``index`` (cyclically) with the samples
    passed over. When none can be used, ``(None, ...)`` whose last entry says so (without a file)."""
    bad: list[Bad] = []
    for step in range(size):
        try:
            return load((index + step) % size), bad
        except BadSampleError as error:
            bad.append(_bad_of(error))
    return None, [*bad, ("", f"none of the {size} samples of the set can be used, e.g. {bad[0][1]}")]


def _collate(collate: Callable, items: list[tuple[Any, list[Bad]]]) -> tuple[Any, list[Bad]]:
    good = [item for item, _ in items if item is not None]
    return (collate(good) if good else None), [entry for _, bad in items for entry in bad]


class ReportingLoader(DataLoader):
    """A DataLoader over ``(item, bad)`` pairs (:class:`Guarded`, or a training dataset that replaces bad
    samples): batches the items with ``collate_fn``, hands the bad samples to ``bad_samples`` in the main
    process and yields the batches (a batch whose every item was left out is skipped)."""

    def __init__(self, dataset: Dataset, *, bad_samples: BadSamples, collate_fn: Callable, **kwargs) -> None:
        super().__init__(dataset, collate_fn=partial(_collate, collate_fn), **kwargs)
        self.bad_samples = bad_samples

    @property
    def items(self) -> Dataset:
        """The dataset the items come from, without the ``(item, bad)`` wrapping."""
        return self.dataset.dataset

    def __iter__(self) -> Iterator[Any]:
        for batch, bad in super().__iter__():
            if bad:
                self.bad_samples.report([entry for entry in bad if entry[0]])
                unusable = [message for path, message in bad if not path]
                if unusable:  # a training set without a single usable sample
                    raise DataError(unusable[0])
            if batch is not None:
                yield batch
