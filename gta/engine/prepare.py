"""Features applied to a method's models before training, each a small step of its own: SyncBatchNorm,
the device, the channels_last layout, data parallelism (identical start on every rank, gradients averaged
by DistributedDataParallel), ``torch.compile``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gta.contract import Method
from gta.engine.config import TrainerConfig
from gta.engine.distributed import Distributed, to_sync_batchnorm


def models_of(method: Method) -> dict[str, nn.Module]:
    """Every model of the method by name (evaluated and trained), each checked to hold the method's state."""
    models = {**method.evaluated_models(), **method.trained_models()}
    if sum(len(m.state_dict()) for m in distinct(models.values())) != len(method.state_dict()):
        raise ValueError(f"{type(method).__name__} keeps state outside its models; checkpoints would miss it")
    return models


def distinct(models) -> list[nn.Module]:
    return list({id(model): model for model in models}.values())


@dataclass(frozen=True)
class Prepared:
    #: the memory format input batches must take
    memory_format: torch.memory_format
    #: by trained model: what each of its losses passes through before backward (data parallelism)
    data_parallel: dict[str, Callable[[torch.Tensor], torch.Tensor]]


def prepare(method: Method, config: TrainerConfig, dist: Distributed) -> Prepared:
    """Apply the configured features to ``method``'s models, in place (the method keeps its references:
    no model is wrapped)."""
    if config.sync_bn:
        to_sync_batchnorm(method, dist.device)
    method.to(dist.device)
    memory_format = torch.preserve_format
    if config.channels_last:  # weights and input batches: the layout convolutions run fastest in on GPUs
        memory_format = torch.channels_last
        method.to(memory_format=memory_format)
    trained = method.trained_models()
    data_parallel = {name: dist.data_parallel(model) for name, model in trained.items()}  # rank 0's weights
    models = distinct(models_of(method).values())
    untrained = [m for m in models if all(m is not t for t in trained.values())]
    dist.broadcast_models(untrained)  # the others (an EMA teacher) start from rank 0's too
    if config.compile:  # in place: the state_dict keys, and so the checkpoints, stay those of the plain models
        for model in models:
            model.compile()
    return Prepared(memory_format, data_parallel)
