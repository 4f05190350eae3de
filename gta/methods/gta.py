"""GTA-Seg (Algorithm 1, docs/algorithm.md §2): a gentle teaching assistant learns from pseudo-labels, the
student from labels, and the teacher is the EMA of the student.

Pseudo-labels may train a feature extractor (through the assistant) but never the student's mask
predictor: the student's g only ever sees ground truth. This module is the paper's algorithm alone; the
released code's behaviours extend it in ``gta.methods.reference``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from gta.contract import Batch, Progress, Update
from gta.methods.base import SelfTraining
from gta.methods.ema import EMA, ema_, ema_model_
from gta.methods.pseudo_label import PseudoLabels, weighted_cross_entropy

TRANSMIT = ("feature_extractor", "all")
#: what a model learns from (Table 7 routes the assistant's and the student's data)
DATA = ("labeled", "pseudo", "labeled+pseudo")


class GTASeg(SelfTraining):
    """``transmit``: what the student receives from the assistant by EMA (Eq. 9), its ``feature_extractor``
    (the paper) or ``all``; ``assistant_data`` / ``student_data``: what each learns from (Table 7),
    ``labeled``, ``pseudo`` or ``labeled+pseudo``; ``options``: the pseudo-labelling settings of
    ``SelfTraining`` (``drop``, ``unsup_weight``, ``warmup_epochs``, ``cutmix_prob``, ``ignore_index``)."""

    def __init__(
        self,
        model: Callable[[], nn.Module],
        ema: EMA,
        reweight: Callable[[Tensor, Tensor], Tensor],
        transmit: str = "feature_extractor",
        assistant_data: str = "pseudo",
        student_data: str = "labeled",
        **options: Any,
    ) -> None:
        super().__init__(model, ema, reweight, **options)
        if transmit not in TRANSMIT:
            raise ValueError(f"method.transmit must be one of {TRANSMIT}, got '{transmit}'")
        for key, value in (("assistant_data", assistant_data), ("student_data", student_data)):
            if value not in DATA:
                raise ValueError(f"method.{key} must be one of {DATA}, got '{value}'")
        self.assistant = copy.deepcopy(self.student)
        self.transmit = transmit
        self.assistant_data, self.student_data = assistant_data, student_data

    def followers(self) -> list[nn.Module]:
        return [self.teacher, self.assistant]

    def trained_models(self) -> dict[str, nn.Module]:
        return {"student": self.student, "assistant": self.assistant}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student, "assistant": self.assistant}

    def semi_supervised_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        decay = self.ema.decay(self.since_hand_over(progress))

        # Steps 1-3: the teacher's pseudo-labels, least confident pixels dropped, re-weighted (Eq. 6).
        targets = self.pseudo_labels(batch)

        # Steps 4-5 (Eqs. 7-8): the assistant learns from pseudo-labels (method.assistant_data).
        assistant = self.losses(self.assistant, self.assistant_data, batch, targets)
        update("assistant", self.total(assistant))

        # Step 6 (Eq. 9): representation knowledge transmission into the student's feature extractor.
        ema_(self.transmitted(self.student), self.transmitted(self.assistant), decay)

        # Step 7 (Eqs. 10-11): the student learns from ground truth (method.student_data).
        student = self.losses(self.student, self.student_data, batch, targets)
        update("student", self.total(student))

        # Step 8 (Eq. 12): the teacher is the EMA of the whole student.
        self.update_teacher(targets, decay)

        stats = {f"assistant/{key}": loss.detach() for key, loss in assistant.items()}
        stats |= {f"student/{key}": loss.detach() for key, loss in student.items()}
        return stats | {"kept": targets.keep.float().mean()}

    def losses(self, model: nn.Module, data: str, batch: Batch, targets: PseudoLabels) -> dict[str, Tensor]:
        """What ``model`` learns from ``data``: L_l on labels (Eq. 10) and/or L_u on pseudo-labels (Eq. 7)."""
        sources = data.split("+")
        losses = {}
        if "labeled" in sources:
            losses["loss_l"] = self.labeled_loss(model, batch)
        if "pseudo" in sources:
            losses["loss_u"] = self.unlabeled_loss(model, targets)
        return losses

    def unlabeled_loss(self, model: nn.Module, targets: PseudoLabels) -> Tensor:
        """L_u (Eq. 7): the weighted cross-entropy of ``model``, in train mode, on the pseudo-labels."""
        model.train()
        return weighted_cross_entropy(model(targets.image), targets, self.ignore_index)

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        return losses.get("loss_l", 0.0) + self.unsup_weight * losses.get("loss_u", 0.0)

    def transmitted(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters Eq. 9 moves: f (``transmit=feature_extractor``) or everything (``all``)."""
        if self.transmit == "all":
            return list(model.parameters())
        return model.feature_extractor_parameters()

    def update_teacher(self, targets: PseudoLabels, decay: float) -> None:
        """Eq. 12, with the BatchNorm statistics averaged like the weights (docs/algorithm.md §2)."""
        ema_model_(self.teacher, self.student, decay)
