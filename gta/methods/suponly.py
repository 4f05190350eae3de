"""SupOnly: one network trained on labeled data alone (the lower bound of every table)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gta.contract import Batch, Method, Progress, Update


class SupOnly(Method):
    reported = "student"
    uses_unlabeled = False

    def __init__(self, model: Callable[[], nn.Module], ignore_index: int = 255) -> None:
        super().__init__()
        self.student = model()
        self.ignore_index = ignore_index

    def trained_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, torch.Tensor]:
        self.student.train()
        loss_l = F.cross_entropy(self.student(batch.image), batch.mask, ignore_index=self.ignore_index)
        update("student", loss_l)
        return {"student/loss_l": loss_l.detach()}
