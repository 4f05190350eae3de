"""A Trainer on tiny synthetic data, a logger that keeps what it is given, and a deep state comparison:
shared by the reliability, speed and distributed tests, which drive the engine in-process."""

from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

import torch
from tiny import TinySegmenter

from gta.config import TrainerConfig
from gta.data import SyntheticShapes, build_loaders, select_split
from gta.engine.evaluate import EvalProtocol, Validation
from gta.engine.trainer import Trainer
from gta.methods import GTASeg
from gta.methods.ema import EMA
from gta.methods.reweight import Confidence
from gta.tracking import NullLogger

ITERS = 8  # 2 iterations per epoch: a warm-up epoch, then GTA-Seg proper across three epoch boundaries


def shapes(root: Path) -> SyntheticShapes:
    """8 labeled (4 of them used as unlabeled by the split of 4), 4 validation images of 32 px."""
    return SyntheticShapes(root, num_labeled_pool=8, num_unlabeled=0, num_val=4, image_size=32)


class Recorder(NullLogger):
    """Keeps the logged metrics; can send this process ``signum`` after logging step ``signal_at``."""

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGUSR1) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.signal_at, self.signum = signal_at, signum

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)
        if step == self.signal_at and any(k.startswith("train/") for k in metrics):
            os.kill(os.getpid(), self.signum)


def make_trainer(
    source: SyntheticShapes, run_dir: Path, logger: Recorder | None = None, method_cls=GTASeg, num_classes: int = 6,
    dist=None, **options,
) -> Trainer:
    """GTA-Seg (or ``method_cls``) for ITERS iterations of 2 + 2 images, logging every step; ``options``
    are TrainerConfig fields. With ``dist``, each rank draws other initial weights (rank 0's win) and CutMix
    boxes, and the ranks' models are compared after every iteration."""
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    loaders = build_loaders(
        source, select_split(source, 4), batch_size=2, num_workers=0, seed=0, need_unlabeled=True, rank=rank,
        world_size=world_size,
    )
    torch.manual_seed(rank)
    method = method_cls(
        model=lambda: TinySegmenter(num_classes), ema=EMA(0.9), reweight=Confidence(), cutmix_prob=0.5
    )
    config = TrainerConfig(**{
        "iters": ITERS, "epochs": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "decoder_lr_mult": 1.0,
        "check_sync_every": 1 if dist else 0, **options,
    })
    validation = Validation(loaders.val, EvalProtocol(), 6, 255, list(source.class_names))
    return Trainer(
        config, method, loaders, partial(torch.optim.SGD, lr=0.05, momentum=0.9), validation, run_dir,
        logger=logger or Recorder(), dist=dist,
    )


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
