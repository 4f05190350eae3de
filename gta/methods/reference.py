"""GTA-Seg as the released training code runs it (docs/algorithm.md §5): each difference from the paper a
switch of ``Reference``, all off by default, so ``GTASegReference`` with no switch on is ``GTASeg``.

``method=gta_reference`` builds it; ``method=gta_released`` turns every switch on, with the released
code's EMA decay (§5.6, ``ema.alpha=0.999``) and its data-pipeline differences (§5.8 ``dataset.pad_label``,
§5.10 ``dataset.scale_pivot``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gta.contract import Batch, Progress, Update
from gta.methods.ema import ema_
from gta.methods.gta import GTASeg
from gta.methods.pseudo_label import PseudoLabels, make_targets, mixed_predictions


@dataclass(frozen=True)
class Reference:
    #: §5.1 after the first semi-supervised epoch the student's and the assistant's classifier are one
    #: tensor, trained by both optimisers (on ground truth and on pseudo-labels): tied, see ``ties``
    shared_classifier: bool = False
    #: §5.2 all through the first semi-supervised epoch, teacher and assistant are the student's tensors
    #: (tied), so that epoch is plain self-training of the student
    resync_first_epoch: bool = False
    #: §5.3 the poly schedule drives the student's optimiser only; the assistant keeps its base lr
    constant_assistant_lr: bool = False
    #: §5.4 pseudo-labels from the eval-mode teacher on the un-mixed images, confidences (threshold and
    #: weights) from a second, train-mode teacher forward on the CutMixed batch
    mixed_confidence: bool = False
    #: §5.5 L_u = Σ_kept (c+1)·CE / (Σ_kept (c+1) + number of dropped pixels)
    dropped_in_normaliser: bool = False
    #: §5.7 the student's forward also sees the unlabeled images (BatchNorm statistics only) and the
    #: teacher keeps BatchNorm statistics of its own train-mode forwards instead of averaging them
    bn_from_forwards: bool = False
    #: §5.9 during the warm-up teacher and assistant run train-mode forwards on the labeled batches, and
    #: the hand-over copies the student's parameters only, leaving their BatchNorm statistics behind
    warmup_forwards: bool = False


class GTASegReference(GTASeg):
    def __init__(self, *args, reference: Reference | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference or Reference()

    def scheduled(self, name: str) -> bool:
        return not (name == "assistant" and self.reference.constant_assistant_lr)  # §5.3

    # --- warm-up and hand-over (§5.9) --------------------------------------------------------------------
    def warmup_step(self, batch: Batch, update: Update) -> dict[str, Tensor]:
        if self.reference.warmup_forwards:
            with torch.no_grad():
                for model in self.followers():
                    model.train()(batch.image)
        return super().warmup_step(batch, update)

    @torch.no_grad()
    def hand_over(self) -> None:
        if not self.reference.warmup_forwards:
            return super().hand_over()
        for model in self.followers():
            copy_(model.parameters(), self.student.parameters())

    # --- the semi-supervised iteration ------------------------------------------------------------------
    def semi_supervised_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        ties = self.ties(first_epoch=self.since_hand_over(progress) < progress.iters_per_epoch)
        for tie in ties:  # the student's values, as the released code's first link gives
            copy_tie_(tie, self.student)
        trained = self.trained_models()

        def tied_update(name: str, loss: Tensor) -> None:
            update(name, loss)
            for tie in ties:
                if trained[name] in tie:
                    copy_tie_(tie, trained[name])

        return super().semi_supervised_step(batch, progress, tied_update)

    def ties(self, first_epoch: bool) -> list[dict[nn.Module, list[Tensor]]]:
        """The released code's parameter links this iteration (§5.1, §5.2): groups of models whose listed
        parameters are one tensor there (it assigns ``.data``), so that a step of either optimiser moves
        all. Here each model keeps tensors of its own and the model that steps copies its tied parameters
        into the others' (``semi_supervised_step``). That gives the same numbers: between steps tied
        parameters are equal, and the EMAs in between (Eqs. 9 and 12) leave a tensor averaged with an
        equal one exactly as it is. And no model shares storage with another, which data-parallel
        training and checkpoints take as they are."""
        ref = self.reference
        if ref.resync_first_epoch and first_epoch:  # §5.2: teacher and assistant are the student
            return [{model: list(model.parameters()) for model in (self.student, *self.followers())}]
        if ref.shared_classifier and not first_epoch:  # §5.1: one classifier g
            return [{model: model.mask_predictor_parameters() for model in (self.student, self.assistant)}]
        return []

    def pseudo_labels(self, batch: Batch) -> PseudoLabels:
        if not self.reference.mixed_confidence:
            return super().pseudo_labels(batch)
        # §5.4: labels from the eval-mode teacher on the un-mixed images, confidences from a train-mode
        # forward on the mixed batch
        image, _, label, valid = mixed_predictions(
            self.teacher, batch.unlabeled, batch.unlabeled_mask, self.cutmix_prob, self.ignore_index
        )
        with torch.no_grad():
            confidence = self.teacher.train()(image).float().softmax(dim=1).max(dim=1).values
        return make_targets(image, confidence, label, valid, self.drop, self.reweight, self.ignore_index)

    def losses(self, model: nn.Module, data: str, batch: Batch, targets: PseudoLabels) -> dict[str, Tensor]:
        sources = data.split("+")
        if not (self.reference.bn_from_forwards and model is self.student and "labeled" in sources):
            return super().losses(model, data, batch, targets)
        # §5.7: the student's labeled forward takes the mixed unlabeled images along, for BatchNorm only
        model.train()
        logits = model(torch.cat([batch.image, targets.image]))[: batch.image.shape[0]]
        losses = {"loss_l": F.cross_entropy(logits, batch.mask, ignore_index=self.ignore_index)}
        if "pseudo" in sources:
            losses["loss_u"] = self.unlabeled_loss(model, targets)
        return losses

    def unlabeled_loss(self, model: nn.Module, targets: PseudoLabels) -> Tensor:
        if not self.reference.dropped_in_normaliser:
            return super().unlabeled_loss(model, targets)
        # §5.5: the dropped pixels join the normaliser, whatever the re-weighting
        model.train()
        ce = F.cross_entropy(model(targets.image).float(), targets.label, ignore_index=self.ignore_index,
                             reduction="none")
        raw = (targets.confidence + 1.0) * targets.keep
        dropped = (targets.valid & ~targets.keep).sum()
        return (raw * ce).sum() / (raw.sum() + dropped).clamp_min(1)

    def update_teacher(self, targets: PseudoLabels, decay: float) -> None:
        if not self.reference.bn_from_forwards:
            return super().update_teacher(targets, decay)
        # §5.7: parameters only; the teacher's statistics follow its own train-mode forward on the mixed
        # batch (with §5.4 that forward already ran in pseudo_labels)
        ema_(list(self.teacher.parameters()), list(self.student.parameters()), decay)
        if not self.reference.mixed_confidence:
            with torch.no_grad():
                self.teacher.train()(targets.image)


@torch.no_grad()
def copy_(targets: Iterable[Tensor], sources: Iterable[Tensor]) -> None:
    for t, s in zip(targets, sources, strict=True):
        t.copy_(s)


def copy_tie_(tie: dict[nn.Module, list[Tensor]], source: nn.Module) -> None:
    """Every model of ``tie`` takes ``source``'s values of its tied parameters."""
    for model, tensors in tie.items():
        if model is not source:
            copy_(tensors, tie[source])
