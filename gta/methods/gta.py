"""GTA-Seg (Algorithm 1): a gentle teaching assistant learns from pseudo-labels, the student from labels.

Pseudo-labels may train a feature extractor (through the assistant) but never the student's mask
predictor: the student's g only ever sees ground truth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gta.methods.base import Batch, Method, Progress, Update
from gta.methods.ema import EMA, ema_, ema_model_
from gta.methods.pseudo_label import teacher_targets, weighted_cross_entropy

TRANSMIT = ("feature_extractor", "all")


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
    ) -> None:
        super().__init__()
        if transmit not in TRANSMIT:
            raise ValueError(f"method.transmit must be one of {TRANSMIT}, got '{transmit}'")
        self.teacher, self.student, self.assistant = model(), model(), model()
        self.ema, self.reweight = ema, reweight
        self.ignore_index, self.drop, self.unsup_weight = ignore_index, drop, unsup_weight
        self.warmup_epochs, self.cutmix_prob, self.transmit = warmup_epochs, cutmix_prob, transmit

    def trained_models(self) -> dict[str, nn.Module]:
        # The teacher has an optimiser for the warm-up only; afterwards it is an EMA of the student.
        return {"teacher": self.teacher, "student": self.student, "assistant": self.assistant}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student, "assistant": self.assistant}

    def supervised_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        model.train()
        return F.cross_entropy(model(batch.image), batch.mask, ignore_index=self.ignore_index)

    def transmitted(self, model: nn.Module) -> list[nn.Parameter]:
        if self.transmit == "all":
            return list(model.parameters())
        return model.feature_extractor_parameters()

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, torch.Tensor]:
        if progress.epoch < self.warmup_epochs:
            # Warm-up: all three models learn from labeled data.
            losses = {name: self.supervised_loss(model, batch) for name, model in self.trained_models().items()}
            for name, loss in losses.items():
                update(name, loss)
            return {"loss_l": losses["student"].detach()}

        decay = self.ema.decay(progress.iteration - self.warmup_epochs * progress.iters_per_epoch)

        # Steps 1-3: the teacher's pseudo-labels, least confident pixels dropped, re-weighted (Eq. 6).
        targets = teacher_targets(
            self.teacher, batch.unlabeled, batch.unlabeled_mask, drop=self.drop, reweight=self.reweight,
            cutmix_prob=self.cutmix_prob, ignore_index=self.ignore_index,
        )

        # Steps 4-5 (Eqs. 7-8): the assistant learns from pseudo-labels only.
        self.assistant.train()
        loss_u = weighted_cross_entropy(self.assistant(targets.image), targets, self.ignore_index)
        update("assistant", self.unsup_weight * loss_u)

        # Step 6 (Eq. 9): representation knowledge transmission into the student's feature extractor;
        # the student's BatchNorm statistics stay its own, re-estimated by its train-mode forwards.
        ema_(self.transmitted(self.student), self.transmitted(self.assistant), decay)

        # Step 7 (Eqs. 10-11): the student learns from ground truth only.
        loss_l = self.supervised_loss(self.student, batch)
        update("student", loss_l)

        # Step 8 (Eq. 12): the teacher is the EMA of the whole student.
        ema_model_(self.teacher, self.student, decay)
        return {"loss_l": loss_l.detach(), "loss_u": loss_u.detach(), "kept": targets.keep.float().mean()}
