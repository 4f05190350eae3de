"""The contract between a method and the engine: the one module both import.

A method owns its networks and the algorithm; the engine owns everything else (devices, precision,
optimisers, schedules, data, evaluation, logging, checkpoints). The engine hands ``training_step`` an
``update`` callback: ``update(name, loss)`` back-propagates ``loss`` and steps the optimiser of the
model ``name``, so the method decides *when* each model learns (Algorithm 1 interleaves steps and EMA
updates) while the engine decides *how* a step is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

Update = Callable[[str, Tensor], None]


@dataclass(frozen=True)
class Progress:
    """Where training is: the global iteration (0-based) and the length of an epoch."""

    iteration: int
    iters_per_epoch: int

    @property
    def epoch(self) -> int:
        return self.iteration // self.iters_per_epoch


@dataclass
class Batch:
    """A labeled batch (x_l, y_l) and, for semi-supervised methods, an unlabeled batch x_u.

    ``unlabeled_mask`` holds the ignore index where x_u is crop padding and 0 elsewhere: it carries no
    ground truth, only which pixels are real image.
    """

    image: Tensor
    mask: Tensor
    unlabeled: Tensor | None = None
    unlabeled_mask: Tensor | None = None


class Method(nn.Module):
    """Base class: the networks are submodules, so ``state_dict`` holds every model of the method."""

    #: the model whose validation mIoU is the method's result (``val/miou``)
    reported: str = "teacher"
    #: whether the engine must load unlabeled images at all
    uses_unlabeled: bool = True
    ignore_index: int = 255

    def trained_models(self) -> dict[str, nn.Module]:
        """The models that have an optimiser, by name (the names ``update`` accepts)."""
        raise NotImplementedError

    def evaluated_models(self) -> dict[str, nn.Module]:
        """The models evaluated on the validation set, by name (``val/<name>/miou``)."""
        raise NotImplementedError

    def reported_at(self, progress: Progress) -> str:
        """The model whose mIoU is the result after ``progress.iteration`` iterations: ``reported``, unless
        that model is not yet worth reporting (a teacher that is still a copy of the untrained network)."""
        return self.reported

    def scheduled(self, name: str) -> bool:
        """Whether the learning-rate schedule applies to model ``name``'s optimiser."""
        return True

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        """One iteration; returns the scalars worth logging (detached)."""
        raise NotImplementedError

    def inspect(self, batch: Batch) -> dict[str, Tensor]:
        """Per-pixel maps (B x H x W) of what the method makes of ``batch.unlabeled``, by title, for the
        pictures logged at each evaluation: integer maps are classes (the ignore index: none), boolean maps
        a selection, float maps values >= 0. It must change no state and draw no random numbers."""
        return {}

    def labeled_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """L_l (Eq. 10): the cross-entropy of ``model``, in train mode, on the labeled batch."""
        model.train()
        return F.cross_entropy(model(batch.image), batch.mask, ignore_index=self.ignore_index)
