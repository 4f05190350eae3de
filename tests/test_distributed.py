"""Data-parallel training: two CPU processes over gloo.

``torchrun`` drives the real command end to end; the in-process tests start two processes with
``torch.multiprocessing`` and check the engine's collectives, the desync check and exact resume.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from runs import ROOT, tiny
from tiny import TinySegmenter
from trainers import Recorder, assert_same_state, shapes
from trainers import make_trainer as make_tiny_trainer

from gta.data import build_val_loader
from gta.engine.checkpoint import load_checkpoint
from gta.engine.distributed import DesyncError, Distributed
from gta.engine.evaluate import EvalProtocol, confusion_matrices
from gta.engine.guard import NonFiniteLossError
from gta.engine.signals import TrainingInterrupted
from gta.engine.trainer import Trainer
from gta.methods import GTASeg

WORLD = 2
ITERS = 6  # 2 images per rank and iteration (CutMix pairs them), 4 unlabeled images: 1 iteration per epoch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    shapes(root).pools()  # generated once, before the processes start
    return root


def join(rank: int, port: int) -> Distributed:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )  # a collective that one rank never joins fails the test instead of hanging it
    return Distributed(rank, WORLD, torch.device("cpu"))


def spawn(fn, *args) -> None:
    mp.spawn(fn, args=(free_port(), *args), nprocs=WORLD)


# --- the command ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_trains_two_processes_into_one_run_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # ${now:...%f} differs between any two processes unless they share rank 0's start time
    run_dir = f"hydra.run.dir={tmp_path}/runs/${{now:%H-%M-%S-%f}}"
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={free_port()}",
        "-m", "gta", "train", *tiny(tmp_path / "data"), "logger=none", "trainer.check_sync_every=1", run_dir,
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    (run,) = (tmp_path / "runs").iterdir()  # one directory, written by rank 0 alone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert {"config.yaml", "result.json", "teacher.pt", "split"} <= {p.name for p in run.iterdir()}
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and len(state["rng_other_ranks"]) == WORLD - 1
    # One summary: only rank 0 prints. Every step compared the ranks' models (check_sync_every=1).
    assert result.stdout.count("val mIoU teacher") == 1


# --- the collectives ------------------------------------------------------------------------------------
def _collectives(rank: int, port: int, data_root: Path, confusion: torch.Tensor) -> None:
    dist = join(rank, port)
    torch.manual_seed(rank)
    model, other = TinySegmenter(6), TinySegmenter(6)
    torch.manual_seed(0)
    expected = TinySegmenter(6).state_dict()

    dist.broadcast_models([model, other])
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())

    # Validation shares are disjoint; their confusion matrices add up to the whole set's.
    val = build_val_loader(shapes(data_root), shapes(data_root).pools()["val"], rank=rank, world_size=WORLD)
    assert len(val) == 2
    found = confusion_matrices({"m": model}, val, 6, 255, EvalProtocol(), dist.device)["m"]
    assert torch.equal(found, confusion)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.full_like(p, rank + 1.0)
    model.head.bias.grad = None  # unused on every rank: stays without a gradient
    dist.average_gradients(optimizer)
    assert all(torch.equal(p.grad, torch.full_like(p, 1.5)) for p in model.features.parameters())
    assert model.head.bias.grad is None

    bn = model.features[1]
    bn.running_mean.fill_(rank)
    bn.num_batches_tracked.fill_(7)
    dist.average_buffers([model, model, other])
    assert torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 0.5)) and bn.num_batches_tracked == 7

    means = dist.mean({"b": torch.tensor(2.0 * rank), "a": torch.tensor(1.0)})
    assert {key: float(value) for key, value in means.items()} == {"a": 1.0, "b": 1.0}
    assert dist.nonfinite(torch.tensor(float(rank))) is None
    assert dist.nonfinite(torch.tensor(float("nan") if rank else 1.0)) == "nan on rank 1"
    assert dist.first_signal(signal.SIGUSR1 if rank == 0 else None) == signal.SIGUSR1
    assert dist.first_signal(None) is None
    assert dist.broadcast_object(f"rank {rank}") == "rank 0"
    assert dist.gather_object(rank) == [0, 1]

    models = {"teacher": other, "student": model}
    dist.check_sync(models, step=3)
    if rank == 1:
        with torch.no_grad():
            model.head.weight[0, 0, 0, 0] += 1e-6  # one element, one rank
    with pytest.raises(DesyncError, match=r"after iteration 4 .*'student' differs from rank 0's on rank 1\.") as error:
        dist.check_sync(models, step=4)
    assert "teacher" not in str(error.value)
    torch.distributed.destroy_process_group()


def test_gradients_buffers_and_checks_agree_across_processes(data_root):
    torch.manual_seed(0)
    model = TinySegmenter(6)
    val = build_val_loader(shapes(data_root), shapes(data_root).pools()["val"])
    confusion = confusion_matrices({"m": model}, val, 6, 255, EvalProtocol(), torch.device("cpu"))["m"]
    spawn(_collectives, data_root, confusion)


# --- the trainer ----------------------------------------------------------------------------------------
def make_trainer(data_root: Path, run_dir: Path, dist: Distributed, logger: Recorder | None = None, **options) -> Trainer:
    return make_tiny_trainer(shapes(data_root), run_dir, logger, dist=dist, **{"iters": ITERS, **options})


def _stop_and_resume(rank: int, port: int, data_root: Path, tmp_path: Path) -> None:
    dist = join(rank, port)
    reference = make_trainer(data_root, tmp_path / "reference", dist)
    reference.fit()

    # Only rank 0 receives the signal; both ranks checkpoint after the same iteration and stop.
    stopped = make_trainer(data_root, tmp_path / "run", dist, Recorder(signal_at=3 if rank == 0 else None))
    with pytest.raises(TrainingInterrupted, match=r"SIGUSR1 after iteration 3"):
        stopped.fit()
    torch.distributed.barrier()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert state["iteration"] == 3 and len(state["rng_other_ranks"]) == 1

    resumed = make_trainer(data_root, tmp_path / "run", dist)
    resumed.resume(state, last)
    resumed.fit()
    for key in ("models", "optimizers"):
        assert_same_state(resumed.state_dict(ITERS)[key], reference.state_dict(ITERS)[key])
    # the losses of both ranks' batches, the same as uninterrupted
    assert resumed.logger.metrics == {step: m for step, m in reference.logger.metrics.items() if step > 3}
    assert resumed.history[-1].miou == reference.history[-1].miou
    torch.distributed.destroy_process_group()


def test_a_signal_on_one_rank_stops_all_and_resume_is_exact(data_root, tmp_path):
    spawn(_stop_and_resume, data_root, tmp_path)


class NaNOnRank1(GTASeg):
    """GTA-Seg whose assistant loss turns NaN on rank 1 alone, at the 3rd iteration."""

    def training_step(self, batch, progress, update):
        def poisoned(name, loss):
            bad = name == "assistant" and progress.iteration == 2 and torch.distributed.get_rank() == 1
            update(name, loss * float("nan") if bad else loss)

        return super().training_step(batch, progress, poisoned)


def _nonfinite_on_one_rank(rank: int, port: int, data_root: Path, tmp_path: Path) -> None:
    dist = join(rank, port)
    # Checked without a per-step sync: first at the checkpoint due after iteration 4, on both ranks.
    trainer = make_trainer(
        data_root, tmp_path, dist, method_cls=NaNOnRank1, log_every=100, checkpoint_every=2, check_sync_every=0
    )
    last = tmp_path / "checkpoints" / "last.pt"
    expected = (
        r"non-finite loss nan on rank 1 for model 'assistant' at iteration 3; training stopped at iteration 4 "
        rf".*{last} \(iteration 2\), is intact"
    )
    with pytest.raises(NonFiniteLossError, match=expected):
        trainer.fit()
    torch.distributed.barrier()
    state = load_checkpoint(last)
    assert state["iteration"] == 2
    assert all(t.isfinite().all() for weights in state["models"].values() for t in weights.values())
    torch.distributed.destroy_process_group()


def test_a_nonfinite_loss_on_one_rank_stops_all_before_the_checkpoint(data_root, tmp_path):
    spawn(_nonfinite_on_one_rank, data_root, tmp_path)


def test_sync_bn_on_the_cpu_is_refused_by_name(data_root, tmp_path):
    with pytest.raises(ValueError, match=r"trainer.sync_bn=true needs CUDA \(this run is on cpu\)"):
        make_trainer(data_root, tmp_path, Distributed(), sync_bn=True)
