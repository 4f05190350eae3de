"""Data-parallel training over several processes, one per GPU; PyTorch's DistributedDataParallel averages
the gradients.

``torchrun --nproc_per_node=N -m gta train ...`` starts N processes on a machine; ``launcher=slurm``
with ``hydra.launcher.gpus_per_node=N`` starts N SLURM tasks per node (several nodes with
``hydra.launcher.nodes``). Each process learns its place from the environment (:func:`setup`), loads its
own share of every batch and trains the whole method on it. The processes' models stay identical:

- at start, every rank takes rank 0's parameters and buffers (DistributedDataParallel does it for the
  trained models, :meth:`Distributed.broadcast_models` for the others, such as an EMA teacher);
- the loss of each ``update(name, loss)`` passes through a ``DistributedDataParallel`` over that model's
  parameters before its backward (:meth:`Distributed.data_parallel`): DDP all-reduces the gradients
  bucket by bucket from backward hooks, overlapping the rest of the backward pass. Entered with the loss
  rather than wrapped around the model's forward, it counts every parameter the loss reaches, however
  many calls of the model (or of its submodules) built the graph, and the method never sees a wrapper;
- after each iteration the floating buffers of every model (BatchNorm running statistics, which each
  rank estimated on other images) are averaged (:meth:`Distributed.average_buffers`, one all-reduce);
- EMA updates and knowledge transmission need nothing: they are functions of identical models.

What is the engine's own is what PyTorch does not offer: agreeing on non-finite losses and stop signals,
and :meth:`Distributed.check_sync`, which verifies the result (``trainer.check_sync_every``).
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from gta.engine.runtime import resolve_device
from gta.errors import ConfigError


class DesyncError(RuntimeError):
    """The models are no longer identical on all ranks."""


@dataclass(frozen=True)
class Distributed:
    """This process's place among the processes of one training run. A single process is rank 0 of 1;
    every method is then a no-op, so the trainer calls them unconditionally."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, prints and writes the run's files."""
        return self.rank == 0

    # --- objects -------------------------------------------------------------------------------------
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable object), on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank."""
        if not self.active:
            return [obj]
        objects: list[Any] = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    # --- scalars -------------------------------------------------------------------------------------
    def _gather_values(self, values: torch.Tensor) -> torch.Tensor:
        """(world_size, *values.shape) float64 tensor of every rank's ``values``, on this rank's device."""
        local = values.detach().to(self.device, torch.float64).reshape(-1)
        everyone = torch.empty(self.world_size * local.numel(), dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(everyone, local)
        return everyone.view(self.world_size, *values.shape)

    def nonfinite(self, loss: torch.Tensor) -> str | None:
        """None when ``loss`` is finite on every rank, else the offending values (with their ranks when
        there are several processes), so that all ranks skip or stop on the same step. One host sync."""
        if not self.active:
            value = float(loss.detach())
            return None if math.isfinite(value) else str(value)
        values = self._gather_values(loss.reshape(())).tolist()
        bad = [f"{value} on rank {rank}" for rank, value in enumerate(values) if not math.isfinite(value)]
        return ", ".join(bad) or None

    def first_signal(self, received: int | None) -> int | None:
        """The stop signal any rank has received (the highest number if several), so that all ranks
        checkpoint and stop after the same iteration."""
        if not self.active:
            return received
        flag = torch.tensor([received or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def mean(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The average over ranks of each scalar (every rank must hold the same keys)."""
        if not self.active or not values:
            return dict(values)
        keys = sorted(values)
        flat = torch.stack([values[key].detach().to(self.device, torch.float32).reshape(()) for key in keys])
        dist.all_reduce(flat)
        return dict(zip(keys, (flat / self.world_size).unbind(), strict=True))

    # --- models --------------------------------------------------------------------------------------
    def data_parallel(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """What each loss of ``model`` passes through before its backward, so that the backward leaves on
        every rank the gradients averaged over the ranks: a ``DistributedDataParallel`` over ``model``'s
        parameters (which gives every rank rank 0's parameters and buffers now), or, alone, the identity.

        ``find_unused_parameters``: DDP walks the loss's graph to find the parameters it reaches, and
        treats the others as unused in this step (a second mask predictor during a warm-up). Buffers are
        not broadcast at each call: :meth:`average_buffers` averages every model's once an iteration."""
        if not self.active:
            return _identity
        return DistributedDataParallel(
            _LossOf(model), device_ids=[self.device] if self.device.type == "cuda" else None,
            find_unused_parameters=True, forward_sync_buffers=False,
        )

    @torch.no_grad()
    def broadcast_models(self, models: Iterable[nn.Module]) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``models``."""
        if not self.active:
            return
        for group in _by_dtype(t for model in _distinct(models) for t in (*model.parameters(), *model.buffers())):
            flat = _flatten_dense_tensors(group)
            dist.broadcast(flat, src=0)
            if not self.is_main:
                torch._foreach_copy_(group, _unflatten_dense_tensors(flat, group))

    @torch.no_grad()
    def average_buffers(self, models: Iterable[nn.Module]) -> None:
        """Average the floating buffers (BatchNorm running statistics) of ``models`` over the ranks, in
        one all-reduce per dtype; integer buffers (batch counters) are equal on every rank already."""
        if not self.active:
            return
        for group in _by_dtype(b for model in _distinct(models) for b in model.buffers() if b.is_floating_point()):
            flat = _flatten_dense_tensors(group)
            dist.all_reduce(flat)
            flat /= self.world_size
            torch._foreach_copy_(group, _unflatten_dense_tensors(flat, group))

    @torch.no_grad()
    def check_sync(self, models: Mapping[str, nn.Module], step: int) -> None:
        """Raise :class:`DesyncError` naming each model and the ranks where it differs from rank 0's.

        Compares two float64 checksums per model (sum and sum of squares of every parameter and buffer),
        bit for bit: the ranks' models are copies of each other, so their checksums are too."""
        if not self.active:
            return
        names = list(models)
        local = torch.stack([_checksum(models[name], self.device) for name in names])
        everyone = self._gather_values(local).cpu().view(torch.int64)
        problems = []
        for i, name in enumerate(names):
            ranks = [rank for rank in range(1, self.world_size) if not torch.equal(everyone[rank, i], everyone[0, i])]
            if ranks:
                problems.append(f"'{name}' differs from rank 0's on rank{'s' if len(ranks) > 1 else ''} "
                                + ", ".join(map(str, ranks)))
        if problems:
            raise DesyncError(
                f"after iteration {step} the models are no longer identical on all {self.world_size} ranks: "
                + "; ".join(problems)
                + ". Something changed one rank's weights or buffers outside update() and the engine's averaging of buffers"
            )


class _LossOf(nn.Module):
    """``model``'s parameters as DistributedDataParallel sees them, with the identity as forward: DDP is
    called with the loss about to be back-propagated, never with the model's inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def _identity(loss: torch.Tensor) -> torch.Tensor:
    return loss


def _distinct(models: Iterable[nn.Module]) -> list[nn.Module]:
    return list({id(model): model for model in models}.values())


def _by_dtype(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The non-empty ``tensors`` grouped by dtype and device, so that each group flattens into one tensor."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def _checksum(model: nn.Module, device: torch.device) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for t in (*model.parameters(), *model.buffers()):
        t = t.detach().double()
        total += torch.stack([t.sum(), t.square().sum()])
    return total


def to_sync_batchnorm(module: nn.Module, device: torch.device) -> None:
    """``trainer.sync_bn``: every BatchNorm layer inside ``module`` (a method, never a BatchNorm layer
    itself) becomes a SyncBatchNorm with the same tensors, normalising with the global batch's statistics."""
    if device.type != "cuda":
        raise ConfigError(
            f"trainer.sync_bn=true needs CUDA (this run is on {device}): SyncBatchNorm exchanges batch "
            "statistics between GPUs. Use device=cuda, or trainer.sync_bn=false"
        )
    nn.SyncBatchNorm.convert_sync_batchnorm(module)


# --- set-up ----------------------------------------------------------------------------------------------
_current: Distributed | None = None


def _place() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process, from the environment.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A task of a submitit job
    (``launcher=slurm`` or ``launcher=local`` with several tasks) has them exported by submitit from its
    job environment (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, a port derived from the job id).

    The master's address, where rank 0 holds the rendezvous, is on SLURM the address of the node that
    launched the tasks, ``SLURM_LAUNCH_NODE_IPADDR``: submitit's batch script, which SLURM runs on the
    job's first node, starts them with ``srun``, and task 0 runs on that first node. submitit would give
    the first node's name, which need not resolve on the nodes: SLURM reaches a node by its address
    (``NodeAddr``), which may differ from its name (``NodeName``)."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            # Device choice is ours (the GPU of the local rank), so CUDA_VISIBLE_DEVICES stays as it is.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            if os.environ["SUBMITIT_EXECUTOR"] == "slurm":
                os.environ["MASTER_ADDR"] = os.environ["SLURM_LAUNCH_NODE_IPADDR"]
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0))


def setup(device_name: str) -> Distributed:
    """Join the run's other processes, if it has any (see :func:`_place`), and pick this process's
    device: the GPU of its local rank with ``device=auto``/``cuda``. Process groups use NCCL on CUDA,
    gloo on the CPU. Idempotent: a process joins once and keeps its place."""
    global _current
    rank, world_size, local_rank = _place()
    if world_size == 1:
        return Distributed(device=resolve_device(device_name))
    if _current is not None:
        return _current
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"device={device_name} names one GPU, but this process is rank {rank} of {world_size}: use "
                "device=cuda or device=auto (each process takes the GPU of its local rank)"
            )
        count = torch.cuda.device_count()
        index = 0 if count == 1 else local_rank  # one GPU visible: the scheduler gave each task its own
        if index >= count:
            raise ConfigError(
                f"rank {rank} (local rank {local_rank}) has no GPU of its own: this node shows {count}; start "
                "one process per GPU (torchrun --nproc_per_node, hydra.launcher.gpus_per_node)"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        atexit.register(dist.destroy_process_group)
    _current = Distributed(rank, world_size, device)
    return _current
