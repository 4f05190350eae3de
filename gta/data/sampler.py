"""A deterministic, resumable, distributed-aware epoch sampler."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "derive_seed"]


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (e.g. ``(seed, epoch)``).

    Hashing through ``SeedSequence`` keeps nearby keys (epoch 3 vs 4, seed 0 vs 1) statistically
    independent, unlike ``seed + epoch``.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochSampler(Sampler[int]):
    """Yields ``num_samples`` indices into a dataset of ``size`` items per epoch for this rank.

    The full sequence is a concatenation of seeded permutations of ``range(size)`` (so a small labeled set
    is repeated to match a longer unlabeled epoch), cut to ``num_samples * world_size`` and strided by rank,
    which makes the ranks' shares disjoint within each permutation. The order depends only on
    ``(seed, epoch)``, never on what was iterated before, so a run can resume mid-epoch exactly with
    :meth:`set_epoch`.
    """

    def __init__(
        self, size: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if size < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got size={size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.size = size
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, skipping the first ``start`` indices of this rank's sequence (to resume)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.epoch = epoch
        self.start = start

    def indices(self) -> list[int]:
        """This rank's full index sequence for the current epoch (ignoring ``start``)."""
        total = self.num_samples * self.world_size
        if total == 0:
            return []
        repeats = math.ceil(total / self.size)
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(repeats)])
        else:
            order = torch.arange(self.size).repeat(repeats)
        return order[:total][self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
