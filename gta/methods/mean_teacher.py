"""Mean Teacher: the teacher (EMA of the student) pseudo-labels x_u; the student learns L_l + μ L_u."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gta.contract import Batch, Progress, Update
from gta.methods.base import SelfTraining
from gta.methods.ema import ema_model_
from gta.methods.pseudo_label import weighted_cross_entropy


class MeanTeacher(SelfTraining):
    def trained_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student}

    def semi_supervised_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        targets = self.pseudo_labels(batch)
        # One forward over x_l and x_u together, so BatchNorm sees both, as in the usual Mean Teacher.
        self.student.train()
        logits = self.student(torch.cat([batch.image, targets.image]))
        logits_l, logits_u = logits.split([batch.image.shape[0], targets.image.shape[0]])
        loss_l = F.cross_entropy(logits_l, batch.mask, ignore_index=self.ignore_index)
        loss_u = weighted_cross_entropy(logits_u, targets, self.ignore_index)
        update("student", loss_l + self.unsup_weight * loss_u)
        ema_model_(self.teacher, self.student, self.ema.decay(self.since_hand_over(progress)))
        return {"student/loss_l": loss_l.detach(), "student/loss_u": loss_u.detach(), "kept": targets.keep.float().mean()}
