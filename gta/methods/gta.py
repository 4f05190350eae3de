"""GTA-Seg (Algorithm 1): a gentle teaching assistant learns from pseudo-labels, the student from labels.

Pseudo-labels may train a feature extractor (through the assistant) but never the student's mask
predictor: the student's g only ever sees ground truth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gta.methods.base import Batch, Method, Progress, Update
from gta.methods.ema import EMA, ema_, ema_model_
from gta.methods.pseudo_label import PseudoLabels, teacher_targets, weighted_cross_entropy

TRANSMIT = ("feature_extractor", "all")
#: what a model learns from (Table 7 routes the assistant's and the student's data)
DATA = ("labeled", "pseudo", "labeled+pseudo")


class GTASeg(Method):
    def __init__(
        self,
        model: Callable[[], nn.Module],
        ema: EMA,
        reweight: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        ignore_index: int = 255,
        drop: float = 0.2,
        unsup_weight: float = 1.0,
        warmup_epochs: int = 1,
        cutmix_prob: float = 0.5,
        transmit: str = "feature_extractor",
        assistant_data: str = "pseudo",
        student_data: str = "labeled",
    ) -> None:
        super().__init__()
        if transmit not in TRANSMIT:
            raise ValueError(f"method.transmit must be one of {TRANSMIT}, got '{transmit}'")
        for key, value in (("assistant_data", assistant_data), ("student_data", student_data)):
            if value not in DATA:
                raise ValueError(f"method.{key} must be one of {DATA}, got '{value}'")
        self.teacher, self.student, self.assistant = model(), model(), model()
        self.ema, self.reweight = ema, reweight
        self.ignore_index, self.drop, self.unsup_weight = ignore_index, drop, unsup_weight
        self.warmup_epochs, self.cutmix_prob, self.transmit = warmup_epochs, cutmix_prob, transmit
        self.assistant_data, self.student_data = assistant_data, student_data

    def trained_models(self) -> dict[str, nn.Module]:
        # The teacher has an optimiser for the warm-up only; afterwards it is an EMA of the student.
        return {"teacher": self.teacher, "student": self.student, "assistant": self.assistant}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student, "assistant": self.assistant}

    def supervised_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        model.train()
        return F.cross_entropy(model(batch.image), batch.mask, ignore_index=self.ignore_index)

    def losses(self, model: nn.Module, data: str, batch: Batch, targets: PseudoLabels) -> dict[str, Tensor]:
        """What ``model`` learns from ``data``: L_l on labels (Eq. 10) and/or L_u on pseudo-labels (Eq. 7)."""
        sources = data.split("+")
        losses = {}
        if "labeled" in sources:
            losses["loss_l"] = self.supervised_loss(model, batch)
        if "pseudo" in sources:
            model.train()
            losses["loss_u"] = weighted_cross_entropy(model(targets.image), targets, self.ignore_index)
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        return losses.get("loss_l", 0.0) + self.unsup_weight * losses.get("loss_u", 0.0)

    def transmitted(self, model: nn.Module) -> list[nn.Parameter]:
        if self.transmit == "all":
            return list(model.parameters())
        return model.feature_extractor_parameters()

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, torch.Tensor]:
        if progress.epoch < self.warmup_epochs:
            # Warm-up: all three models learn from labeled data.
            models = self.trained_models()
            losses = {name: self.supervised_loss(model, batch) for name, model in models.items()}
            for name, loss in losses.items():
                update(name, loss)
            return {"student/loss_l": losses["student"].detach()}

        decay = self.ema.decay(progress.iteration - self.warmup_epochs * progress.iters_per_epoch)

        # Steps 1-3: the teacher's pseudo-labels, least confident pixels dropped, re-weighted (Eq. 6).
        targets = teacher_targets(
            self.teacher, batch.unlabeled, batch.unlabeled_mask, drop=self.drop, reweight=self.reweight,
            cutmix_prob=self.cutmix_prob, ignore_index=self.ignore_index,
        )

        # Steps 4-5 (Eqs. 7-8): the assistant learns from pseudo-labels only (method.assistant_data).
        assistant = self.losses(self.assistant, self.assistant_data, batch, targets)
        update("assistant", self.total(assistant))

        # Step 6 (Eq. 9): representation knowledge transmission into the student's feature extractor;
        # the student's BatchNorm statistics stay its own, re-estimated by its train-mode forwards.
        ema_(self.transmitted(self.student), self.transmitted(self.assistant), decay)

        # Step 7 (Eqs. 10-11): the student learns from ground truth only (method.student_data).
        student = self.losses(self.student, self.student_data, batch, targets)
        update("student", self.total(student))

        # Step 8 (Eq. 12): the teacher is the EMA of the whole student.
        ema_model_(self.teacher, self.student, decay)
        stats = {f"assistant/{key}": loss.detach() for key, loss in assistant.items()}
        stats |= {f"student/{key}": loss.detach() for key, loss in student.items()}
        return stats | {"kept": targets.keep.float().mean()}
