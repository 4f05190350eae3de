"""Unbiased self-training (Chen et al. 2022, "Debiased self-training"), the Table 5 comparison.

One feature extractor f carries two mask predictors: the main head learns only from labels, an extra
pseudo head learns only from the teacher's pseudo-labels, and both send gradients into the shared f.
Pseudo-labels thus shape f, as in GTA-Seg, but through a head of the same network instead of a separate
assistant. As in Mean Teacher, the teacher is the EMA of the student (f and main head) and labels x_u;
the pseudo head is never evaluated: the student and teacher predict with the main head.
"""

from __future__ import annotations

import torch
from torch import nn

from gta.contract import Batch, Progress, Update
from gta.methods.base import SelfTraining
from gta.methods.ema import ema_model_
from gta.methods.pseudo_label import weighted_cross_entropy


class WithPseudoHead(nn.Module):
    """A network (f and its main head) plus a pseudo head on the same f; ``forward`` is the main head."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.pseudo_head = network.new_mask_predictor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def pseudo(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, mask_predictor=self.pseudo_head)

    def param_groups(self, decoder_lr_mult: float) -> list[dict]:
        """The network's groups; the pseudo head, trained from scratch like the main head, at its rate."""
        head = list(self.pseudo_head.parameters())
        return [*self.network.param_groups(decoder_lr_mult), {"params": head, "lr_mult": decoder_lr_mult,
                                                              "name": "pseudo_head"}]


class UnbiasedST(SelfTraining):
    def make_student(self, network: nn.Module) -> nn.Module:
        return WithPseudoHead(network)

    @property
    def student_network(self) -> nn.Module:
        """f and the main head: what the teacher copies and averages (never the pseudo head)."""
        return self.student.network

    def trained_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student}

    def semi_supervised_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, torch.Tensor]:
        targets = self.pseudo_labels(batch)
        loss_l = self.labeled_loss(self.student, batch)
        # The main head sees only ground truth, the pseudo head only pseudo-labels; f learns from both.
        loss_u = weighted_cross_entropy(self.student.pseudo(targets.image), targets, self.ignore_index)
        update("student", loss_l + self.unsup_weight * loss_u)
        ema_model_(self.teacher, self.student_network, self.ema.decay(self.since_hand_over(progress)))
        return {"student/loss_l": loss_l.detach(), "student/loss_u": loss_u.detach(), "kept": targets.keep.float().mean()}
