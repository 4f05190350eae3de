"""GTA-Seg (Algorithm 1): a gentle teaching assistant learns from pseudo-labels, the student from labels.

Pseudo-labels may train a feature extractor (through the assistant) but never the student's mask
predictor: the student's g only ever sees ground truth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gta.methods.base import Batch, Progress, SelfTraining, Update
from gta.methods.ema import EMA, ema_, ema_model_
from gta.methods.pseudo_label import PseudoLabels, weighted_cross_entropy
from gta.methods.reference import Reference, copy_, share_, unshare_

TRANSMIT = ("feature_extractor", "all")
#: what a model learns from (Table 7 routes the assistant's and the student's data)
DATA = ("labeled", "pseudo", "labeled+pseudo")


class GTASeg(SelfTraining):
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
        reference: Reference | None = None,
    ) -> None:
        super().__init__(ema, reweight, ignore_index, drop, unsup_weight, warmup_epochs, cutmix_prob)
        if transmit not in TRANSMIT:
            raise ValueError(f"method.transmit must be one of {TRANSMIT}, got '{transmit}'")
        for key, value in (("assistant_data", assistant_data), ("student_data", student_data)):
            if value not in DATA:
                raise ValueError(f"method.{key} must be one of {DATA}, got '{value}'")
        self.teacher, self.student, self.assistant = model(), model(), model()
        self.transmit = transmit
        self.assistant_data, self.student_data = assistant_data, student_data
        #: the released code's behaviours (ALGORITHM.md §5); all off: the paper's
        self.reference = reference or Reference()

    def trained_models(self) -> dict[str, nn.Module]:
        # The teacher has an optimiser for the warm-up only; afterwards it is an EMA of the student.
        return {"teacher": self.teacher, "student": self.student, "assistant": self.assistant}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student, "assistant": self.assistant}

    def scheduled(self, name: str) -> bool:
        return not (name == "assistant" and self.reference.constant_assistant_lr)

    def supervised_loss(self, model: nn.Module, batch: Batch, bn_only: Tensor | None = None) -> Tensor:
        """L_l (Eq. 10); ``bn_only`` images join the forward for BatchNorm statistics alone (§5.7)."""
        model.train()
        images = batch.image if bn_only is None else torch.cat([batch.image, bn_only])
        logits = model(images)[: batch.image.shape[0]]
        return F.cross_entropy(logits, batch.mask, ignore_index=self.ignore_index)

    def losses(self, model: nn.Module, data: str, batch: Batch, targets: PseudoLabels) -> dict[str, Tensor]:
        """What ``model`` learns from ``data``: L_l on labels (Eq. 10) and/or L_u on pseudo-labels (Eq. 7)."""
        sources = data.split("+")
        bn_only = targets.image if self.reference.bn_from_forwards and model is self.student else None
        losses = {}
        if "labeled" in sources:
            losses["loss_l"] = self.supervised_loss(model, batch, bn_only)
        if "pseudo" in sources:
            model.train()
            losses["loss_u"] = weighted_cross_entropy(
                model(targets.image), targets, self.ignore_index, self.reference.dropped_in_normaliser
            )
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        return losses.get("loss_l", 0.0) + self.unsup_weight * losses.get("loss_u", 0.0)

    def transmitted(self, model: nn.Module) -> list[nn.Parameter]:
        if self.transmit == "all":
            return list(model.parameters())
        return model.feature_extractor_parameters()

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, torch.Tensor]:
        if progress.epoch < self.warmup_epochs:
            return self.warmup(batch, update)
        self.link_like_the_reference_code(progress)
        decay = self.ema.decay(progress.iteration - self.warmup_epochs * progress.iters_per_epoch)

        # Steps 1-3: the teacher's pseudo-labels, least confident pixels dropped, re-weighted (Eq. 6).
        targets = self.pseudo_labels(batch, mixed_confidence=self.reference.mixed_confidence)

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
        self.update_teacher(targets.image, decay)
        stats = {f"assistant/{key}": loss.detach() for key, loss in assistant.items()}
        stats |= {f"student/{key}": loss.detach() for key, loss in student.items()}
        return stats | {"kept": targets.keep.float().mean()}

    def update_teacher(self, unlabeled: Tensor, decay: float) -> None:
        """Eq. 12, BatchNorm statistics averaged too; with §5.7 parameters only, the teacher's statistics
        following its own train-mode forward on the (mixed) unlabeled batch instead."""
        if not self.reference.bn_from_forwards:
            ema_model_(self.teacher, self.student, decay)
            return
        ema_(list(self.teacher.parameters()), list(self.student.parameters()), decay)
        if not self.reference.mixed_confidence:  # with §5.4 that forward already ran in teacher_targets
            with torch.no_grad():
                self.teacher.train()(unlabeled)

    def warmup(self, batch: Batch, update: Update) -> dict[str, torch.Tensor]:
        """The paper's warm-up: all three models learn from labeled data."""
        if self.reference.warmup_student_only:
            # §5.9: only the student learns; teacher and assistant run forwards (BatchNorm statistics)
            # and copy the student when the semi-supervised loop starts (link_like_the_reference_code).
            with torch.no_grad():
                self.teacher.train()(batch.image)
                self.assistant.train()(batch.image)
            models = {"student": self.student}
        else:
            models = self.trained_models()
        losses = {name: self.supervised_loss(model, batch) for name, model in models.items()}
        for name, loss in losses.items():
            update(name, loss)
        return {"student/loss_l": losses["student"].detach()}

    def link_like_the_reference_code(self, progress: Progress) -> None:
        """Parameter links of the released code (§5.1, 5.2, 5.9), made at the start of a semi-supervised
        iteration. None of them exists with the paper's behaviour (all switches off)."""
        ref = self.reference
        followers = (self.teacher, self.assistant)
        if ref.warmup_student_only and progress.iteration == self.warmup_epochs * progress.iters_per_epoch:
            for model in followers:
                copy_(model.parameters(), self.student.parameters())
        first_epoch = progress.epoch == self.warmup_epochs
        if ref.resync_first_epoch and first_epoch:
            for model in followers:
                share_(model.parameters(), self.student.parameters())
            return
        if ref.resync_first_epoch:  # the re-synced epoch is over: each model owns its tensors again
            unshare_(self.teacher.parameters(), self.student.parameters())
            part = "feature_extractor_parameters" if ref.shared_classifier else "parameters"  # §5.1 keeps g
            unshare_(getattr(self.assistant, part)(), getattr(self.student, part)())
        if ref.shared_classifier and not first_epoch:
            share_(self.assistant.mask_predictor_parameters(), self.student.mask_predictor_parameters())
