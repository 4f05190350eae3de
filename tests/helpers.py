"""What the tests share: the tiny synthetic dataset and the overrides of a seconds-long run on it, ``python -m
gta`` in a subprocess, a logger that keeps what it is given, the Trainer and the methods on the tiny network of
``tests/tiny.py``, and deep state comparison. Fixtures built from these live in ``tests/conftest.py``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
from tiny import TinySegmenter

from gta.contract import Batch
from gta.data import SyntheticShapes, build_loaders, select_split
from gta.engine.config import TrainerConfig
from gta.engine.evaluate import EvalProtocol, Validation
from gta.engine.trainer import Trainer
from gta.methods import GTASeg
from gta.methods.ema import EMA
from gta.methods.reweight import Confidence
from gta.tracking import NullLogger

ROOT = Path(__file__).resolve().parents[1]

# --- the tiny synthetic dataset and a run on it -------------------------------------------------------------

#: 8 labeled images, of which ``split=4`` labels 4 and leaves 4 to the unlabeled set; 4 validation images; 32 px
POOL, SPLIT, VAL, SIZE = 8, 4, 4, 32


def shapes(root: Path, *, unlabeled: int = 0, labeled: int = POOL, val: int = VAL, seed: int = 0) -> SyntheticShapes:
    """The tiny synthetic dataset (generated on first use): ``labeled`` + ``unlabeled`` + ``val`` images."""
    return SyntheticShapes(
        root, num_labeled_pool=labeled, num_unlabeled=unlabeled, num_val=val, image_size=SIZE, seed=seed
    )


def tiny(data_root: Path | None = None, *, unlabeled: int = 8, iters: int = 2, crop: int = SIZE,
         logger: str | None = "none") -> list[str]:
    """Overrides that make a training config a run of seconds on the CPU: the small network, batches of 2 crops
    of ``crop`` px, no loader processes, ``iters`` iterations, each logged, evaluation at the end only, no
    tracking (``logger=None``: the config's). With ``data_root``, on ``shapes(data_root, unlabeled=unlabeled)``:
    4 + ``unlabeled`` unlabeled images, so ``unlabeled=0`` makes 2 iterations an epoch."""
    run = [
        "model=deeplabv3plus_small", f"dataset.crop_size={crop}", "data.batch_size=2", "data.num_workers=0",
        f"trainer.iters={iters}", "trainer.log_every=1", "trainer.eval_every=0", "device=cpu",
    ]
    if logger is not None:
        run.append(f"logger={logger}")
    if data_root is None:
        return run
    return [
        f"dataset.root={data_root}", f"dataset.num_labeled_pool={POOL}", f"dataset.num_unlabeled={unlabeled}",
        f"dataset.num_val={VAL}", f"dataset.image_size={SIZE}", f"split={SPLIT}", f"data.val_batch_size={VAL}", *run,
    ]


# --- subprocesses -------------------------------------------------------------------------------------------


def environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child: this checkout first on the path, one thread, the hub offline,
    Hydra's one-line errors; ``extra`` on top."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HYDRA_FULL_ERROR": "0", **extra}


#: the command line of ``python -m gta`` with this interpreter
GTA = [sys.executable, "-m", "gta"]


def python(*args: str, cwd: Path | None = None, timeout: float = 600, returncode: int | None = 0,
           **extra_env: str) -> subprocess.CompletedProcess:
    """``python *args`` with this interpreter in ``environment(**extra_env)``; fails showing the output's end
    unless it exits with ``returncode`` (None: whatever it exits with)."""
    result = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=environment(**extra_env),
                            capture_output=True, text=True, timeout=timeout)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert returncode is None or result.returncode == returncode, (
        f"python {' '.join(args)} exited {result.returncode}, not {returncode}:\n{output}")
    return result


def gta(*args: str, **options) -> subprocess.CompletedProcess:
    """``python -m gta *args``, as ``python`` runs it."""
    return python("-m", "gta", *args, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a logger that remembers --------------------------------------------------------------------------------


class Recorder(NullLogger):
    """Keeps what it is given (in a config: ``logger=none logger._target_=helpers.Recorder``); can send this
    process ``signum`` once it has logged the training metrics of step ``signal_at``."""

    #: every instance, newest last, so a test can read what a run it did not build logged
    instances: list[Recorder] = []

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGUSR1) -> None:
        self.params: dict[str, str] = {}
        self.metrics: dict[int, dict[str, float]] = {}
        self.artifacts: list[tuple[Path, str | None]] = []
        self.signal_at, self.signum = signal_at, signum
        Recorder.instances.append(self)

    def log_params(self, params) -> None:
        self.params.update(params)

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics.setdefault(step, {}).update(metrics)
        if step == self.signal_at and any(k.startswith("train/") for k in metrics):
            os.kill(os.getpid(), self.signum)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))


# --- methods on the tiny network ----------------------------------------------------------------------------

IPE = 2  # iterations per epoch of the method tests; the warm-up is one epoch


def tiny_method(cls=GTASeg, *, num_classes: int = 3, ema: EMA | None = None, seed: int = 0, **options):
    """``cls`` (GTA-Seg) on the tiny network, weights drawn with ``seed``: EMA 0.9 without ramp unless ``ema``,
    Eq. 6 re-weighting, CutMix half the time; ``options`` are the method's."""
    torch.manual_seed(seed)
    options = {"reweight": Confidence(1.0), "cutmix_prob": 0.5, **options}
    return cls(partial(TinySegmenter, num_classes), ema=ema or EMA(alpha=0.9, ramp=False), **options)


def configured_method(cfg):
    """The method of a composed training config, on the tiny network."""
    from hydra.utils import instantiate

    return instantiate(cfg.method, model=partial(TinySegmenter, cfg.dataset.num_classes))


def make_batch(labeled_value: float = 5.0) -> Batch:
    # Labeled images are a constant no unlabeled image ever contains, so any sighting is detectable.
    x_l = torch.full((2, 3, 8, 8), labeled_value)
    y_l = torch.randint(0, 3, (2, 8, 8))
    x_u = torch.rand(2, 3, 8, 8)
    return Batch(image=x_l, mask=y_l, unlabeled=x_u, unlabeled_mask=torch.zeros(2, 8, 8, dtype=torch.long))


def sgd_update(method, log: list | None = None, check=None, after=None, lr: float = 0.1, momentum: float = 0.0):
    """An ``update`` stepping plain SGD per model: ``check(name, loss)`` first, the name appended to ``log``,
    then the step, then ``after(name)``."""
    opts = {n: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for n, m in method.trained_models().items()}

    def update(name, loss):
        if check:
            check(name, loss)
        if log is not None:
            log.append(name)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        if after:
            after(name)

    return update


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


class NaNAt(GTASeg):
    """GTA-Seg whose assistant loss turns NaN at iteration index ``at`` (the ``at + 1``-th iteration), on every
    process or on ``rank`` alone."""

    def __init__(self, *args, at: int, rank: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.rank = at, rank

    def training_step(self, batch, progress, update):
        here = self.rank is None or torch.distributed.get_rank() == self.rank

        def poisoned(name, loss):
            bad = name == "assistant" and progress.iteration == self.at and here
            update(name, loss * float("nan") if bad else loss)

        return super().training_step(batch, progress, poisoned)


# --- the Trainer --------------------------------------------------------------------------------------------

ITERS = 8  # 2 iterations per epoch: a warm-up epoch, then GTA-Seg proper across three epoch boundaries


def make_trainer(
    source: SyntheticShapes, run_dir: Path, logger: Recorder | None = None, method_cls=GTASeg, num_classes: int = 6,
    dist=None, **options,
) -> Trainer:
    """GTA-Seg (or ``method_cls``) for ITERS iterations of 2 + 2 images, logging every step; ``options``
    are TrainerConfig fields. With ``dist``, each rank draws other initial weights (rank 0's win) and CutMix
    boxes, and the ranks' models are compared after every iteration."""
    rank, world_size = (dist.rank, dist.world_size) if dist else (0, 1)
    loaders = build_loaders(
        source, select_split(source, SPLIT), batch_size=2, num_workers=0, seed=0, need_unlabeled=True, rank=rank,
        world_size=world_size,
    )
    trained = tiny_method(method_cls, num_classes=num_classes, ema=EMA(0.9), reweight=Confidence(), seed=rank)
    config = TrainerConfig(**{
        "iters": ITERS, "epochs": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "decoder_lr_mult": 1.0,
        "check_sync_every": 1 if dist else 0, **options,
    })
    validation = Validation(loaders.val, EvalProtocol(), 6, 255, list(source.class_names))
    return Trainer(
        config, trained, loaders, partial(torch.optim.SGD, lr=0.05, momentum=0.9), validation, run_dir,
        logger=logger or Recorder(), dist=dist,
    )


def contract_trainer(source: SyntheticShapes, loaders, method, run_dir: Path, logger: Recorder | None = None,
                     iters: int = ITERS) -> Trainer:
    """``method`` (of the tiny network, 6 classes) on ``loaders`` for ``iters`` iterations, logging every step."""
    config = TrainerConfig(iters=iters, epochs=1, log_every=1, eval_every=0, checkpoint_every=0, decoder_lr_mult=1.0,
                           check_sync_every=0)
    validation = Validation(loaders.val, EvalProtocol(), 6, 255, list(source.class_names))
    return Trainer(config, method, loaders, partial(torch.optim.SGD, lr=0.05, momentum=0.9), validation, run_dir,
                   logger=logger or Recorder())


def stopped_and_resumed(make, tmp_path: Path, stop: int) -> tuple[Trainer, Trainer]:
    """``make(run_dir, logger=None)``'s run left alone, and stopped by SIGUSR1 after iteration ``stop`` then resumed
    from its ``last.pt``: (reference, resumed), once their models, optimisers and the values logged after the stop
    are checked equal."""
    from gta.engine.checkpoint import load_checkpoint
    from gta.engine.signals import TrainingInterrupted

    reference = make(tmp_path / "reference")
    reference.fit()
    stopped = make(tmp_path / "run", Recorder(stop, signal.SIGUSR1))
    try:
        stopped.fit()
    except TrainingInterrupted:
        pass
    else:
        raise AssertionError(f"the run was not stopped after iteration {stop}")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    resumed = make(tmp_path / "run")
    resumed.resume(load_checkpoint(last), last)
    resumed.fit()
    end = reference.total_iters
    for key in ("models", "optimizers"):
        assert_same_state(resumed.state_dict(end)[key], reference.state_dict(end)[key])
    assert resumed.logger.metrics == {step: m for step, m in reference.logger.metrics.items() if step > stop}
    return reference, resumed


def assert_same_state(a: dict, b: dict) -> None:
    """Two (nested) state dicts hold the same keys and equal values, tensors bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
