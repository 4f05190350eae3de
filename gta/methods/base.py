"""The contract between a method and the engine.

A method owns its networks and the algorithm; the engine owns everything else (devices, precision,
optimisers, schedules, data, evaluation, logging, checkpoints). The engine hands ``training_step`` an
``update`` callback: ``update(name, loss)`` back-propagates ``loss`` and steps the optimiser of the
model ``name``, so the method decides *when* each model learns (Algorithm 1 interleaves steps and EMA
updates) while the engine decides *how* a step is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gta.methods.ema import EMA
from gta.methods.pseudo_label import PseudoLabels, make_targets, predict, teacher_targets

Update = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class Progress:
    """Where training is: the global iteration (0-based) and the schedule it belongs to."""

    iteration: int
    iters_per_epoch: int
    total_iters: int

    @property
    def epoch(self) -> int:
        return self.iteration // self.iters_per_epoch


@dataclass
class Batch:
    """A labeled batch (x_l, y_l) and, for semi-supervised methods, an unlabeled batch x_u.

    ``unlabeled_mask`` holds the ignore index where x_u is crop padding and 0 elsewhere: it carries no
    ground truth, only which pixels are real image.
    """

    image: torch.Tensor
    mask: torch.Tensor
    unlabeled: torch.Tensor | None = None
    unlabeled_mask: torch.Tensor | None = None


class Method(nn.Module):
    """Base class: the networks are submodules, so ``state_dict`` holds every model of the method."""

    #: the model whose validation mIoU is the method's result (``val/miou``)
    reported: str = "teacher"
    #: whether the engine must load unlabeled images at all
    uses_unlabeled: bool = True

    def trained_models(self) -> dict[str, nn.Module]:
        """The models that have an optimiser, by name (the names ``update`` accepts)."""
        raise NotImplementedError

    def evaluated_models(self) -> dict[str, nn.Module]:
        """The models evaluated on the validation set, by name (``val/<name>/miou``)."""
        raise NotImplementedError

    def scheduled(self, name: str) -> bool:
        """Whether the learning-rate schedule applies to model ``name``'s optimiser."""
        return True

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, torch.Tensor]:
        """One iteration; returns the scalars worth logging (detached)."""
        raise NotImplementedError

    def inspect(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-pixel maps (B x H x W) of what the method makes of ``batch.unlabeled``, by title, for the
        pictures logged at each evaluation: integer maps are classes (the ignore index: none), boolean maps
        a selection, float maps values >= 0. It must change no state and draw no random numbers."""
        return {}


class SelfTraining(Method):
    """A method whose teacher pseudo-labels the unlabeled batch: holds the shared settings (EMA decay,
    re-weighting, drop fraction, μ, warm-up, CutMix) and makes the targets of steps 1-3 of Algorithm 1."""

    def __init__(
        self,
        ema: EMA,
        reweight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        ignore_index: int,
        drop: float,
        unsup_weight: float,
        warmup_epochs: int,
        cutmix_prob: float,
    ) -> None:
        super().__init__()
        self.ema, self.reweight = ema, reweight
        self.ignore_index, self.drop, self.unsup_weight = ignore_index, drop, unsup_weight
        self.warmup_epochs, self.cutmix_prob = warmup_epochs, cutmix_prob

    def pseudo_labels(self, batch: Batch, **options) -> PseudoLabels:
        """The teacher's targets for ``batch.unlabeled`` (``options`` go to ``teacher_targets``)."""
        return teacher_targets(
            self.teacher, batch.unlabeled, batch.unlabeled_mask, drop=self.drop, reweight=self.reweight,
            cutmix_prob=self.cutmix_prob, ignore_index=self.ignore_index, **options,
        )

    @torch.no_grad()
    def inspect(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Steps 1-3 on the un-mixed unlabeled images: ŷ, c, the dropped pixels and the weights w (Eq. 6)."""
        confidence, label = predict(self.teacher, batch.unlabeled)
        valid = batch.unlabeled_mask != self.ignore_index
        targets = make_targets(batch.unlabeled, confidence, label, valid, self.drop, self.reweight, self.ignore_index)
        return {
            "pseudo-label": targets.label,
            "confidence": targets.confidence,
            "dropped": valid & ~targets.keep,
            "weight": targets.weight,
        }
