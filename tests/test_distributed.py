"""Data-parallel training: two CPU processes over gloo.

``torchrun`` drives the real command end to end; the in-process tests start two processes with
``torch.multiprocessing`` and check the engine's collectives, that two processes train what one process
trains on both their batches, that gradients are all-reduced during the backward pass, the desync check
and exact resume.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from helpers import NaNAt, Recorder, assert_same_state, free_port, python, shapes, tiny
from helpers import make_trainer as make_tiny_trainer
from tiny import TinySegmenter
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from gta.data import Loaders, build_val_loader
from gta.engine.checkpoint import load_checkpoint
from gta.engine.config import TrainerConfig
from gta.engine.distributed import DesyncError, Distributed, _place
from gta.engine.evaluate import EvalProtocol, Validation, confusion_matrices
from gta.engine.guard import NonFiniteLossError
from gta.engine.signals import TrainingInterrupted
from gta.engine.trainer import Trainer
from gta.methods import CPS, GTASeg, MeanTeacher, UnbiasedST
from gta.methods.ema import EMA
from gta.methods.reweight import Uniform
from gta.tracking import NullLogger

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
    # two iterations end inside the warm-up: the saved model is the one that learns, the student
    assert {"config.yaml", "result.json", "student.pt", "split"} <= {p.name for p in run.iterdir()}
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and len(state["rng_other_ranks"]) == WORLD - 1
    # One summary: only rank 0 prints. Every step compared the ranks' models (check_sync_every=1).
    assert result.stdout.count("val mIoU student") == 1


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
def test_weights_buffers_and_checks_agree_across_processes(source):
    torch.manual_seed(0)
    model = TinySegmenter(6)
    val = build_val_loader(source, source.pools()["val"])
    confusion = confusion_matrices({"m": model}, val, 6, 255, EvalProtocol(), torch.device("cpu"))["m"]
    spawn(_collectives, source.root, confusion)  # the processes read the dataset the fixture generated


# --- gradients -----------------------------------------------------------------------------------------
class TinyGN(TinySegmenter):
    """The tiny network with GroupNorm instead of BatchNorm: each image is normalised on its own, so what a
    forward computes for an image does not depend on the other images of its batch."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__(num_classes)
        self.features[1] = nn.GroupNorm(2, 6)


class FixedBatches:
    """A training loader that yields the same batches every epoch."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.batch_size, self.sampler = batches, len(batches[0][0]), self

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


EQUIVALENCE_ITERS, EQUIVALENCE_IPE, GLOBAL_BATCH = 4, 2, 4  # a warm-up epoch, then a semi-supervised one
#: two trained models updated one after the other; a head used outside forward(); one forward over labeled and
#: unlabeled images from the first iteration on (CutMix-Seg's options; its CutMix pairs images of a process's
#: batch, so it is off here as for every method); two models updated from one iteration's forwards, with a
#: second unlabeled batch. No CutMix, no dropped pixels, no re-weighting.
SELF_TRAINING = {"ema": EMA(0.9, ramp=False), "reweight": Uniform(), "drop": 0.0, "cutmix_prob": 0.0}
METHODS = {"gta": partial(GTASeg, **SELF_TRAINING), "unbiased_st": partial(UnbiasedST, **SELF_TRAINING),
           "cutmix_seg": partial(MeanTeacher, **SELF_TRAINING, warmup_epochs=0), "cps": partial(CPS, boxes=0)}


def equivalence_trainer(method: str, run_dir: Path, dist: Distributed, share: slice) -> Trainer:
    """``method`` on TinyGN for EQUIVALENCE_ITERS iterations of the ``share`` of fixed global batches of
    GLOBAL_BATCH labeled and as many unlabeled images. Nothing in it depends on how the global batch is
    split: no BatchNorm, no CutMix, no dropped pixels, no re-weighting, every pixel labeled (the losses
    are means over equally many pixels per process). Weights drawn with the rank as seed (rank 0's win)."""
    generator = torch.Generator().manual_seed(0)

    def images():
        return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator)[share]

    def masks():
        return torch.randint(0, 3, (GLOBAL_BATCH, 8, 8), generator=generator)[share]

    labeled = [(images(), masks()) for _ in range(EQUIVALENCE_IPE)]
    unlabeled = [(images(), torch.zeros_like(masks())) for _ in range(EQUIVALENCE_IPE)]
    torch.manual_seed(dist.rank)
    trained = METHODS[method](partial(TinyGN, 3))
    second = [(images(), torch.zeros_like(masks())) for _ in range(EQUIVALENCE_IPE)]
    loaders = Loaders(FixedBatches(labeled), FixedBatches(unlabeled), [labeled[0]], EQUIVALENCE_IPE,
                      second_unlabeled=FixedBatches(second) if trained.second_unlabeled else None)
    config = TrainerConfig(iters=EQUIVALENCE_ITERS, epochs=1, log_every=1, eval_every=0, checkpoint_every=0,
                           decoder_lr_mult=1.0, check_sync_every=1)
    validation = Validation(loaders.val, EvalProtocol(), 3, 255, ["a", "b", "c"])
    return Trainer(config, trained, loaders, partial(torch.optim.SGD, lr=0.05, momentum=0.9), validation, run_dir,
                   logger=NullLogger(), dist=dist)


def _data_parallel(rank: int, port: int, tmp_path: Path, expected: dict) -> None:
    dist = join(rank, port)
    _all_reduce_during_backward(dist)
    _train_as_one(dist, tmp_path, expected)
    torch.distributed.destroy_process_group()


def _train_as_one(dist: Distributed, tmp_path: Path, expected: dict) -> None:
    rank = dist.rank
    half = GLOBAL_BATCH // WORLD
    for method, models in expected.items():
        trainer = equivalence_trainer(method, tmp_path / method, dist, slice(rank * half, (rank + 1) * half))
        trainer.fit()  # and compares the ranks' models bit for bit after every iteration (check_sync_every=1)
        for name, state in models.items():
            torch.testing.assert_close(trainer.models[name].state_dict(), state, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, where=f"{method} {name}": f"{where}: {m}")


def _all_reduce_during_backward(dist: Distributed) -> None:
    rank = dist.rank
    torch.manual_seed(rank)
    model = nn.Sequential(*(nn.Linear(512, 512) for _ in range(4)))  # 4 MiB: several buckets, the first 1 MiB
    data_parallel = dist.data_parallel(model)
    events = []

    def launch(state, bucket):
        events.append(f"all-reduce of bucket {bucket.index()}")
        return allreduce_hook(state, bucket)

    data_parallel.register_comm_hook(None, launch)
    model[0].weight.register_post_accumulate_grad_hook(lambda p: events.append("gradient of the first layer"))
    loss = model(torch.randn(8, 512) * (rank + 1)).square().mean()
    data_parallel(loss).backward()
    # the last layers' bucket is reduced while the backward pass still has the first layer to go
    assert events.index("all-reduce of bucket 0") < events.index("gradient of the first layer"), events
    assert len([e for e in events if e.startswith("all-reduce")]) > 1
    for p in model.parameters():  # the averages, equal on both ranks
        gathered = [torch.empty_like(p.grad) for _ in range(WORLD)]
        torch.distributed.all_gather(gathered, p.grad)
        assert torch.equal(gathered[0], gathered[1])


@pytest.mark.slow
def test_gradients_are_averaged_during_backward_and_two_processes_train_as_one(tmp_path):
    expected = {}
    for method in METHODS:  # one process, the whole global batch: the reference, made without any collective
        trainer = equivalence_trainer(method, tmp_path / "one" / method, Distributed(), slice(None))
        trainer.fit()
        expected[method] = {name: model.state_dict() for name, model in trainer.models.items()}
    spawn(_data_parallel, tmp_path / "two", expected)


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


def test_a_slurm_task_meets_rank_0_at_the_launching_nodes_address():
    """Task 1 of a job over the nodes n1 and n2, whose names resolve nowhere: its master is the address of the node
    that launched the tasks (SLURM's), not the first node's name (submitit's)."""
    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1"}
    with mock.patch.dict(os.environ, job):  # and without what _place exports, after
        assert _place() == (1, 2, 0)
        assert os.environ["MASTER_ADDR"] == "10.0.0.1"
