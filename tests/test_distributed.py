"""Data-parallel training: two CPU processes over gloo.

``torchrun`` drives the real command end to end; the in-process tests start two processes with
``torch.multiprocessing`` and check the engine's collectives, the desync check and exact resume.
"""

from __future__ import annotations

import signal
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from helpers import NaNAt, Recorder, assert_same_state, free_port, python, shapes, tiny
from helpers import make_trainer as make_tiny_trainer
from tiny import TinySegmenter

from gta.data import build_val_loader
from gta.engine.checkpoint import load_checkpoint
from gta.engine.distributed import DesyncError, Distributed
from gta.engine.evaluate import EvalProtocol, confusion_matrices
from gta.engine.guard import NonFiniteLossError
from gta.engine.signals import TrainingInterrupted
from gta.engine.trainer import Trainer

WORLD = 2
ITERS = 6  # 2 images per rank and iteration (CutMix pairs them), 4 unlabeled images: 1 iteration per epoch


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
    # ${now:...%f} differs between any two processes unless they share rank 0's start time
    run_dir = f"hydra.run.dir={tmp_path}/runs/${{now:%H-%M-%S-%f}}"
    result = python(
        "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={free_port()}",
        "-m", "gta", "train", *tiny(tmp_path / "data"), "trainer.check_sync_every=1", run_dir, cwd=tmp_path,
        timeout=300,
    )

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


@pytest.mark.slow
def test_gradients_buffers_and_checks_agree_across_processes(source):
    torch.manual_seed(0)
    model = TinySegmenter(6)
    val = build_val_loader(source, source.pools()["val"])
    confusion = confusion_matrices({"m": model}, val, 6, 255, EvalProtocol(), torch.device("cpu"))["m"]
    spawn(_collectives, source.root, confusion)  # the processes read the dataset the fixture generated


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


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_all_and_resume_is_exact(source, tmp_path):
    spawn(_stop_and_resume, source.root, tmp_path)


def _nonfinite_on_one_rank(rank: int, port: int, data_root: Path, tmp_path: Path) -> None:
    dist = join(rank, port)
    # Checked without a per-step sync: first at the checkpoint due after iteration 4, on both ranks.
    trainer = make_trainer(
        data_root, tmp_path, dist, method_cls=partial(NaNAt, at=2, rank=1), log_every=100, checkpoint_every=2,
        check_sync_every=0,
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


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_stops_all_before_the_checkpoint(source, tmp_path):
    spawn(_nonfinite_on_one_rank, source.root, tmp_path)


def test_sync_bn_on_the_cpu_is_refused_by_name(source, tmp_path):
    with pytest.raises(ValueError, match=r"trainer.sync_bn=true needs CUDA \(this run is on cpu\)"):
        make_trainer(source.root, tmp_path, Distributed(), sync_bn=True)
