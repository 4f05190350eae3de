"""The contract between a method and the engine, and the two phases every teacher-based method shares.

A method owns its networks and the algorithm; the engine owns everything else (devices, precision,
optimisers, schedules, data, evaluation, logging, checkpoints). The engine hands ``training_step`` an
``update`` callback: ``update(name, loss)`` back-propagates ``loss`` and steps the optimiser of the
model ``name``, so the method decides *when* each model learns (Algorithm 1 interleaves steps and EMA
updates) while the engine decides *how* a step is taken.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gta.methods.ema import EMA
from gta.methods.pseudo_label import PseudoLabels, make_targets, predict, teacher_targets

Update = Callable[[str, Tensor], None]


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


def follower(network: nn.Module) -> nn.Module:
    """An exact copy of ``network`` (parameters and buffers) that no optimiser trains."""
    return copy.deepcopy(network).requires_grad_(False)


class SelfTraining(Method):
    """A method whose teacher pseudo-labels the unlabeled batch, in two phases (docs/algorithm.md §3).

    Every model starts as an exact copy of one network, the student. During the warm-up
    (``warmup_epochs``) the student learns from labels alone. At the hand-over, the first semi-supervised
    iteration and before any pseudo-label is made, every follower (the teacher; GTA-Seg's assistant too)
    becomes an exact copy of the warmed-up student. Then ``semi_supervised_step`` runs each iteration.
    Also holds the pseudo-labelling settings and makes the targets of steps 1-3 of Algorithm 1.
    """

    def __init__(
        self,
        student: nn.Module,
        ema: EMA,
        reweight: Callable[[Tensor, Tensor], Tensor],
        ignore_index: int,
        drop: float,
        unsup_weight: float,
        warmup_epochs: int,
        cutmix_prob: float,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = follower(self.student_network)
        self.ema, self.reweight = ema, reweight
        self.ignore_index, self.drop, self.unsup_weight = ignore_index, drop, unsup_weight
        self.warmup_epochs, self.cutmix_prob = warmup_epochs, cutmix_prob

    @property
    def student_network(self) -> nn.Module:
        """The part of the student that its followers copy and the teacher averages."""
        return self.student

    def followers(self) -> list[nn.Module]:
        """The models that become copies of the student at the hand-over."""
        return [self.teacher]

    def since_hand_over(self, progress: Progress) -> int:
        """k: iterations since the hand-over (negative during the warm-up)."""
        return progress.iteration - self.warmup_epochs * progress.iters_per_epoch

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        k = self.since_hand_over(progress)
        if k < 0:
            return self.warmup_step(batch, update)
        if k == 0:
            self.hand_over()
        return self.semi_supervised_step(batch, progress, update)

    def warmup_step(self, batch: Batch, update: Update) -> dict[str, Tensor]:
        """The student learns from the labeled batch."""
        loss_l = self.labeled_loss(self.student, batch)
        update("student", loss_l)
        return {"student/loss_l": loss_l.detach()}

    @torch.no_grad()
    def hand_over(self) -> None:
        """Every follower becomes an exact copy of the warmed-up student, parameters and buffers."""
        state = self.student_network.state_dict()
        for model in self.followers():
            model.load_state_dict(state)  # in place: optimisers keep their references

    def semi_supervised_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        raise NotImplementedError

    def pseudo_labels(self, batch: Batch) -> PseudoLabels:
        """Steps 1-3: the teacher's pseudo-labels for ``batch.unlabeled``, CutMixed, thresholded, weighted."""
        return teacher_targets(
            self.teacher, batch.unlabeled, batch.unlabeled_mask, drop=self.drop, reweight=self.reweight,
            cutmix_prob=self.cutmix_prob, ignore_index=self.ignore_index,
        )

    @torch.no_grad()
    def inspect(self, batch: Batch) -> dict[str, Tensor]:
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
