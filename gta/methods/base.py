"""The two phases every teacher-based method shares (docs/algorithm.md §3): warm-up and hand-over."""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gta.contract import Batch, Method, Progress, Update
from gta.methods.ema import EMA
from gta.methods.pseudo_label import PseudoLabels, make_targets, predict, teacher_targets


def follower(network: nn.Module) -> nn.Module:
    """An exact copy of ``network`` (parameters and buffers) that no optimiser trains."""
    return copy.deepcopy(network).requires_grad_(False)


class SelfTraining(Method):
    """A method whose teacher pseudo-labels the unlabeled batch, in two phases (docs/algorithm.md §3).

    Every model starts as an exact copy of one network, the student. During the warm-up
    (``warmup_epochs``) the student learns from labels alone. At the hand-over, the first semi-supervised
    iteration and before any pseudo-label is made, every follower (the teacher; GTA-Seg's assistant too)
    becomes an exact copy of the warmed-up student. Then ``semi_supervised_step`` runs each iteration.
    Also holds the pseudo-labelling settings and makes the targets of steps 1-3 of Algorithm 1: the
    fraction ``drop`` of least confident pixels ignored, CutMix with probability ``cutmix_prob``, the
    unsupervised loss weighted by ``unsup_weight`` (μ); ``model`` makes the network (the config's ``model``).
    """

    def __init__(
        self,
        model: Callable[[], nn.Module],
        ema: EMA,
        reweight: Callable[[Tensor, Tensor], Tensor],
        ignore_index: int = 255,
        drop: float = 0.2,
        unsup_weight: float = 1.0,
        warmup_epochs: int = 1,
        cutmix_prob: float = 0.5,
    ) -> None:
        super().__init__()
        self.student = self.make_student(model())
        self.teacher = follower(self.student_network)
        self.ema, self.reweight = ema, reweight
        self.ignore_index, self.drop, self.unsup_weight = ignore_index, drop, unsup_weight
        self.warmup_epochs, self.cutmix_prob = warmup_epochs, cutmix_prob

    def make_student(self, network: nn.Module) -> nn.Module:
        """The student built around a freshly made ``network`` (Unbiased ST adds a second head)."""
        return network

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

    def reported_at(self, progress: Progress) -> str:
        # Until the hand-over the followers are copies of the untrained network: the student is the model
        # that learns, as the released code reports it during its warm-up.
        return self.reported if self.since_hand_over(progress) > 0 else "student"

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

    @abstractmethod
    def semi_supervised_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        """One iteration after the hand-over; returns the scalars worth logging (detached)."""

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
