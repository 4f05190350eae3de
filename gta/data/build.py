"""Labeled/unlabeled split selection and DataLoader construction."""

from __future__ import annotations

import atexit
import hashlib
import math
import multiprocessing
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, default_collate, get_worker_info

from gta.errors import ConfigError, DataError, MissingFilesError, MissingPathError

from .bad_samples import BadSamples, Guarded, ReportingLoader, replacing
from .sampler import EpochSampler, derive_seed
from .source import Sample, SegmentationFiles, SegmentationSource, read_list
from .transforms import WithViews, eval_transform, train_transform

__all__ = [
    "FAMILIES", "LISTS_DIR", "Loaders", "SplitData", "build_loaders", "build_val_loader", "published_list",
    "select_split", "split_params", "write_split",
]

_LABELED_STREAM, _UNLABELED_STREAM, _SECOND_UNLABELED_STREAM = 0, 1, 2

#: the published labeled lists shipped with the package: ``<family>/<dataset>/<name>.txt`` (README.md there)
LISTS_DIR = Path(__file__).resolve().parent / "splits"
#: what ``split`` names (``data.splits``): a list of the paper's, one of CPS / UniMatch's, or a random draw
FAMILIES = ("paper", "cps", "random")


@dataclass
class SplitData:
    labeled: list[Sample]
    unlabeled: list[Sample]
    val: list[Sample]
    #: how the labeled images were chosen: "paper" or "cps" (a published list), "random", or "split_dir"
    family: str = "random"
    #: the list's name in its family ("183", "1_16"), the split_dir, or the number drawn; "all": the pool
    name: str = "all"


def _parse_split(split: int | str) -> int | None:
    """``None`` for "all", else the number of labeled images."""
    if isinstance(split, str):
        text = split.strip()
        if text.lower() == "all":
            return None
        if text.lstrip("+-").isdigit():
            return int(text)
    elif isinstance(split, (int, np.integer)) and not isinstance(split, bool):
        return int(split)
    raise ConfigError(
        f"split must be a number of labeled images or 'all', got {split!r} (the name of a published list needs "
        "data.splits=paper or cps)"
    )


def _unique_ids(pools: dict[str, list[Sample]], root: Path) -> None:
    counts = Counter(s.id for pool in pools.values() for s in pool)
    duplicates = [i for i, n in counts.items() if n > 1]
    if duplicates:
        raise DataError(f"Dataset at {root} has duplicate sample ids: {sorted(duplicates)[:5]}")


def _lookup(samples: list[Sample], root: Path) -> dict[str, Sample]:
    """Index samples by id and by image path relative to the dataset root."""
    table = {}
    for sample in samples:
        table[sample.id] = sample
        try:
            table[Path(sample.image).relative_to(root).as_posix()] = sample
        except ValueError:
            pass  # image outside root: reachable by id only
    return table


def _is_all(split: int | str) -> bool:
    return isinstance(split, str) and split.strip().lower() == "all"


def _as_int(name: str) -> int | None:
    try:
        return int(name)
    except ValueError:
        return None


def published_list(source: SegmentationSource, family: str, split: int | str) -> Path:
    """The file of the ``family`` list named ``split`` for this dataset, or a ConfigError listing those
    there are."""
    dataset = source.published_lists
    if dataset is None:
        raise ConfigError(
            f"data.splits={family}: {type(source).__name__} has no published split lists; data.splits=random "
            "draws split=N labeled images (with data.split_seed), data.split_dir=DIR reads your own "
            "labeled.txt and unlabeled.txt"
        )
    folder = LISTS_DIR / family / dataset
    # numbers in order (92, 183, ...), then names (1_16, u2pl_1_16, ...)
    names = sorted((p.stem for p in folder.glob("*.txt")), key=lambda n: (not n.isdigit(), len(n), n))
    name = str(split).strip()
    if name not in names and isinstance(split, int):
        # Hydra reads split=1_16 as the number 116 (digit grouping, as Python does): the list named so
        name = next((n for n in names if _as_int(n) == split), name)
    if name not in names:
        raise ConfigError(
            f"split={split}: there is no {family} list for dataset={dataset}; its {family} lists are "
            f"{', '.join(names)} (split=all labels the whole pool; data.splits=random draws any number)"
        )
    return folder / f"{name}.txt"


def _split_from_list(
    source: SegmentationSource, pools: dict[str, list[Sample]], path: Path, family: str
) -> SplitData:
    """The labeled images a published list names; the rest of the labeled pool (and any unlabeled-only
    images) is unlabeled, as the published unlabeled lists are."""
    entries = read_list(path)
    table = _lookup(pools["labeled"], source.root)
    missing = [e for e in entries if e.removeprefix("./").lstrip("/") not in table]
    if missing:
        raise MissingPathError(
            f"{len(missing)} of the {len(entries)} labeled images of the {family} list {path.stem} ({path}) are "
            f"not in the labeled pool of the dataset at {source.root}, e.g. {', '.join(missing[:5])}: is "
            "dataset.root the whole dataset, in the layout of docs/datasets.md?"
        )
    labeled = [table[e.removeprefix("./").lstrip("/")] for e in entries]
    chosen = {s.id for s in labeled}
    pool = sorted(pools["labeled"], key=lambda s: s.id)
    extra = sorted(pools.get("unlabeled", []), key=lambda s: s.id)
    unlabeled = [s for s in pool if s.id not in chosen] + extra
    return SplitData(labeled, unlabeled, list(pools["val"]), family, path.stem)


def _split_from_dir(source: SegmentationSource, pools: dict[str, list[Sample]], split_dir: Path) -> SplitData:
    table = _lookup(pools["labeled"] + pools.get("unlabeled", []), source.root)
    val_table = _lookup(pools["val"], source.root)
    chosen: dict[str, list[Sample]] = {}
    for name in ("labeled", "unlabeled"):
        path = split_dir / f"{name}.txt"
        chosen[name] = []
        for entry in read_list(path):
            key = entry.removeprefix("./").lstrip("/")
            if key not in table:
                where = " (it is a validation sample)" if key in val_table else ""
                raise DataError(
                    f"Entry {entry!r} in {path} matches no sample id or image path of the dataset at "
                    f"{source.root}{where}"
                )
            chosen[name].append(table[key])
    overlap = {s.id for s in chosen["labeled"]} & {s.id for s in chosen["unlabeled"]}
    if overlap:
        raise DataError(
            f"{len(overlap)} samples are both labeled and unlabeled in {split_dir}: {sorted(overlap)[:5]}"
        )
    return SplitData(chosen["labeled"], chosen["unlabeled"], list(pools["val"]), "split_dir", str(split_dir))


def _read_pools(source: SegmentationSource) -> dict[str, list[Sample]]:
    """``source.pools()``, failing on a root that does not exist whatever the class does with it (a dataset class
    of the user's may list nothing there, or stumble on the first file it opens)."""
    missing = MissingPathError(
        f"Dataset root {source.root} does not exist (or is not a directory): set dataset.root to where "
        f"{type(source).__name__} finds its files"
    )
    try:
        pools = source.pools()
    except MissingPathError:
        raise
    except FileNotFoundError as err:
        if source.root.is_dir():
            raise
        raise missing from err
    if not source.root.is_dir():
        raise missing
    return pools


def select_split(
    source: SegmentationSource,
    split: int | str,
    split_seed: int = 0,
    split_dir: str | Path | None = None,
    family: str = "random",
) -> SplitData:
    """Choose the labeled subset and the unlabeled set.

    ``family`` says what ``split`` names. "random": a number N of labeled images drawn (with
    ``split_seed``) from the labeled pool, the rest of which joins the unlabeled set. "paper" or "cps": the
    published list of that name for this dataset (:func:`published_list`), the rest of the pool
    unlabeled. "all" labels the whole pool in every family. With ``split_dir`` (containing ``labeled.txt``
    and ``unlabeled.txt``) those lists are used exactly; ``split`` must then be "all" or match their length.
    """
    if family not in FAMILIES:
        raise ConfigError(f"data.splits={family!r} is not a family of splits; choose one of {', '.join(FAMILIES)}")
    listed = split_dir is None and family != "random" and not _is_all(split)
    # A bad split fails before the dataset is read.
    count = None if listed else _parse_split(split)
    path = published_list(source, family, split) if listed else None
    pools = _read_pools(source)
    _unique_ids(pools, source.root)
    if split_dir is not None:
        result = _split_from_dir(source, pools, Path(split_dir))
        if count is not None and count != len(result.labeled):
            raise ConfigError(
                f"split={split} but {Path(split_dir) / 'labeled.txt'} lists {len(result.labeled)} labeled "
                "samples; set split to that number or 'all'"
            )
    elif path is not None:
        result = _split_from_list(source, pools, path, family)
    else:
        # Sort first: the draw must not depend on the order the file system listed the files in.
        pool = sorted(pools["labeled"], key=lambda s: s.id)
        extra = sorted(pools.get("unlabeled", []), key=lambda s: s.id)
        if count is None:
            count = len(pool)
        if not 0 < count <= len(pool):
            raise ConfigError(
                f"split={count} is not possible: the labeled pool of the dataset at {source.root} has "
                f"{len(pool)} samples (choose 1..{len(pool)} or 'all')"
            )
        picked = set(random.Random(split_seed).sample(range(len(pool)), count))
        labeled = [s for i, s in enumerate(pool) if i in picked]
        unlabeled = [s for i, s in enumerate(pool) if i not in picked] + extra
        name = "all" if _is_all(split) else str(count)
        result = SplitData(labeled, unlabeled, list(pools["val"]), family, name)
    missing_masks = [s.id for s in result.labeled if s.mask is None]
    if missing_masks:
        raise DataError(f"Labeled samples without a mask in {source.root}: {missing_masks[:5]}")
    _check_files_exist(result)
    return result


#: at most this many labeled images are measured to tell whether the crop fits them
MEASURED = 20


def crop_warning(source: SegmentationSource, samples: list[Sample]) -> str | None:
    """What to tell a person whose crop (``source.crop_size``) is larger than most of the images even at the
    largest scale of ``source.scale_range``: every crop is then mostly padding, which costs time and teaches
    nothing. None when the crop fits; up to ``MEASURED`` images, spread over ``samples``, are measured."""
    sizes = []
    for sample in samples[:: max(1, len(samples) // MEASURED)][:MEASURED]:
        try:
            with Image.open(sample.image) as image:
                sizes.append(image.size)
        except OSError:  # an unusable file is the loaders' to report
            continue
    too_small = [(w, h) for w, h in sizes if max(w, h) * source.scale_range[1] < source.crop_size]
    if len(too_small) <= len(sizes) / 2:
        return None
    width, height = (sorted(side)[len(side) // 2] for side in zip(*sizes, strict=True))
    fitting = sorted(min(size) for size in sizes)[len(sizes) // 2]
    return (
        f"dataset.crop_size={source.crop_size} is larger than {len(too_small)} of {len(sizes)} labeled images measured "
        f"(typically {width}x{height}), even scaled by {source.scale_range[1]:g} (dataset.scale_range): every crop is "
        f"mostly padding, which costs time and teaches nothing; set dataset.crop_size={fitting}"
    )


def _check_files_exist(split: SplitData) -> None:
    """Fail before training when a listed image or mask is absent, rather than hours into a run."""
    # Unlabeled samples are used without their masks, which therefore need not exist.
    needed = [(s.id, p) for s in split.labeled + split.val for p in (s.image, s.mask)]
    needed += [(s.id, s.image) for s in split.unlabeled]
    missing = [(sample_id, Path(path)) for sample_id, path in needed if not Path(path).is_file()]
    if missing:
        raise MissingFilesError(
            f"{len(missing)} files listed for this split do not exist, e.g.\n  "
            + "\n  ".join(f"{sample_id}: {path}" for sample_id, path in missing[:5]),
            missing,
        )


def _listing(samples: list[Sample]) -> str:
    return "".join(f"{s.id}\n" for s in samples)


def write_split(split: SplitData, directory: str | Path) -> list[Path]:
    """Write ``labeled.txt``, ``unlabeled.txt`` and ``val.txt`` (one id per line); the first two can be
    fed back as ``split_dir``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("labeled", "unlabeled", "val"):
        path = directory / f"{name}.txt"
        path.write_text(_listing(getattr(split, name)))
        paths.append(path)
    return paths


def split_params(split: SplitData) -> dict[str, str]:
    """What identifies a run's labeled set, as run params: the family and name of its list, its size, and
    the SHA-1 of the ``labeled.txt`` the run writes (``sha1sum <run dir>/split/labeled.txt``)."""
    return {
        "split/family": split.family,
        "split/list": split.name,
        "split/size": str(len(split.labeled)),
        "split/labeled_sha1": hashlib.sha1(_listing(split.labeled).encode()).hexdigest(),
    }


@dataclass
class Loaders:
    labeled: DataLoader
    unlabeled: DataLoader | None
    val: DataLoader
    iters_per_epoch: int
    #: the samples the loaders skipped (data.on_bad_sample), for the trainer to record
    bad_samples: BadSamples = field(default_factory=BadSamples)
    #: a second, independently drawn unlabeled stream (``Method.second_unlabeled``)
    second_unlabeled: DataLoader | None = None
    #: the names of the views an unlabeled item carries after its weak view and padding mask, in order
    views: tuple[str, ...] = ()


def _ignore(signals: tuple[int, ...], worker_id: int) -> None:
    """A loader worker's start: ignore ``signals``. Schedulers signal every process of a job, and the
    training process, which handles them, ends its workers itself."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


@atexit.register  # after multiprocessing's exit handler, so it runs before it
def _end_workers() -> None:
    """At exit multiprocessing ends daemonic children (loader workers) with SIGTERM, then waits for them.
    Training workers ignore SIGTERM, so a loader left alive (say by an error whose traceback keeps it)
    would make the process wait forever: kill them first, with torch's SIGCHLD watch (which would report
    each as a crashed worker) switched off."""
    workers = [process for process in multiprocessing.active_children() if process.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for process in workers:
            process.kill()


class _PositionedSampler(EpochSampler):
    """Yields ``(epoch, position, index)``: each index carries its place in the epoch to the dataset."""

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for position, index in enumerate(self.indices()[self.start :], start=self.start):
            yield self.epoch, position, index


class _PerSampleSeeded(Dataset):
    """Seeds each sample's augmentation from ``(seed, epoch, position in the epoch)``.

    A sample's augmentation then depends neither on what was loaded before nor on which worker loads it:
    a run resumed mid-epoch (``set_epoch(epoch, start)``) draws exactly the augmentations the uninterrupted
    run drew, for any ``num_workers``. In the main process (``num_workers=0``) the CPU RNG state is swapped
    out around each item, so the training process's global RNG is left untouched.

    Items are ``(item, bad)``: a sample whose files cannot be used is replaced by the next usable one of
    the set, seeded the same way, and ``bad`` names what was passed over (``gta.data.bad_samples``).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, position, index = key
        seed = derive_seed(self.seed, epoch, position)
        return replacing(lambda i: self._seeded(seed, i), index, len(self.dataset))

    def _seeded(self, seed: int, index: int):
        if get_worker_info() is not None:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return self.dataset[index]
        outer = torch.get_rng_state()
        torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(outer)


def build_loaders(
    source: SegmentationSource,
    split: SplitData,
    batch_size: int,
    num_workers: int,
    seed: int,
    need_unlabeled: bool,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    val_batch_size: int = 1,
    prefetch_factor: int | None = None,
    on_bad_sample: str = "skip",
    ignored_signals: tuple[int, ...] = (),
    views: dict[str, Callable] | None = None,
    second_unlabeled: bool = False,
) -> Loaders:
    """Training loaders for the labeled and unlabeled streams plus a validation loader.

    An unlabeled item is its weak view (the labeled images' crop, rescale and flip) and its padding mask,
    followed by each of ``views`` (name: pipeline, applied to the same crop: ``WithViews``).
    ``second_unlabeled`` adds a second unlabeled stream of its own order and augmentations.

    An epoch is one pass over the unlabeled set (the labeled set if there is none); the labeled stream is
    repeated/reshuffled to the same number of iterations. Call ``loader.sampler.set_epoch(epoch, start)``
    on both training loaders before each epoch. Workers persist across epochs; each keeps
    ``prefetch_factor`` batches ready (None: PyTorch's default, 2). A sample whose files cannot be used
    is skipped or stops the run as ``on_bad_sample`` says (``gta.data.bad_samples``).
    """
    if not split.labeled:
        raise DataError("The split has no labeled samples")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    _check_prefetch(prefetch_factor, num_workers)
    bad_samples = BadSamples(on_bad_sample)
    epoch_set = split.unlabeled or split.labeled
    iters_per_epoch = math.ceil(len(epoch_set) / (batch_size * world_size))
    geometry = (source.crop_size, source.scale_range, source.mean, source.std, source.ignore_index, source.flip,
                source.pad_label, source.scale_pivot)  # fmt: skip
    augment = train_transform(*geometry)
    augment_unlabeled = WithViews(views, augment) if views else augment
    common = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
        "prefetch_factor": prefetch_factor,
    }

    def train_loader(samples: list[Sample], stream: int, with_mask: bool) -> DataLoader:
        files = SegmentationFiles(
            samples, augment if with_mask else augment_unlabeled, source.num_classes, source.ignore_index,
            source.label_lut, with_mask=with_mask,
        )  # fmt: skip
        # The order must be identical on all ranks (they take strided shares), so its seed ignores rank;
        # augmentation must differ per rank, so that seed includes it.
        sampler = _PositionedSampler(
            len(samples), iters_per_epoch * batch_size, derive_seed(seed, stream), rank, world_size
        )
        return ReportingLoader(
            _PerSampleSeeded(files, derive_seed(seed, stream, rank)),
            bad_samples=bad_samples,
            collate_fn=default_collate,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            # A private generator, so creating iterators does not consume the global RNG.
            generator=torch.Generator().manual_seed(derive_seed(seed, stream, rank, 1)),
            worker_init_fn=partial(_ignore, tuple(ignored_signals)),
            **common,
        )

    if need_unlabeled and not split.unlabeled:
        raise ConfigError(
            f"The method needs unlabeled images but the split of {source.root} has none "
            f"({len(split.labeled)} labeled); use a smaller split or a dataset with an unlabeled pool"
        )
    labeled = train_loader(split.labeled, _LABELED_STREAM, with_mask=True)
    unlabeled = train_loader(split.unlabeled, _UNLABELED_STREAM, with_mask=False) if need_unlabeled else None
    second = train_loader(split.unlabeled, _SECOND_UNLABELED_STREAM, with_mask=False) if second_unlabeled else None

    val = build_val_loader(
        source, split.val, val_batch_size, num_workers, rank, world_size, pin_memory, prefetch_factor, bad_samples
    )
    return Loaders(labeled, unlabeled, val, iters_per_epoch, bad_samples, second, tuple(views or ()))


def _check_prefetch(prefetch_factor: int | None, num_workers: int) -> None:
    if prefetch_factor is None:
        return
    if num_workers == 0 or prefetch_factor < 1:
        raise ConfigError(
            f"data.prefetch_factor={prefetch_factor} needs data.num_workers > 0 (worker processes prefetch; "
            f"data.num_workers={num_workers}) and a value >= 1; null keeps PyTorch's default"
        )


def build_val_loader(
    source: SegmentationSource,
    samples: list[Sample],
    batch_size: int = 1,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    bad_samples: BadSamples | None = None,
) -> DataLoader:
    """Whole validation images in a fixed order; rank r of ``world_size`` gets samples r, r+w, ...,
    disjoint shares without the duplicates a DistributedSampler pads with, so per-rank confusion
    matrices can simply be summed. Images of different sizes never share a batch (see
    :func:`collate_by_size`), so ``batch_size`` is safe for datasets like VOC. A sample whose files cannot
    be used is left out or stops the loader, as ``bad_samples`` says (default: stop)."""
    val: Dataset = SegmentationFiles(
        samples, eval_transform(source.mean, source.std), source.num_classes, source.ignore_index,
        source.label_lut,
    )  # fmt: skip
    if world_size > 1:
        val = Subset(val, range(rank, len(val), world_size))
    _check_prefetch(prefetch_factor, num_workers)
    return ReportingLoader(
        Guarded(val), bad_samples=bad_samples or BadSamples("stop"), collate_fn=collate_by_size,
        batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, prefetch_factor=prefetch_factor,
        # A private generator: each pass would otherwise draw its workers' base seed from the global RNG
        # and so change the CutMix boxes and dropout masks of every iteration after an evaluation.
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def collate_by_size(items: list[tuple[torch.Tensor, torch.Tensor]]):
    """One ``[images, masks]`` batch when all images have one size, else a list of ``(images, masks)``
    batches, one per size (``gta.engine.evaluate.confusion_matrices`` takes both)."""
    groups: dict[tuple[int, ...], list] = {}
    for item in items:
        groups.setdefault(tuple(item[0].shape), []).append(item)
    if len(groups) == 1:
        return default_collate(items)
    return [tuple(default_collate(group)) for group in groups.values()]
