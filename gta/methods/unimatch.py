"""UniMatch (Yang et al., CVPR 2023): weak-to-strong consistency with one network and no teacher.

Per iteration, for a labeled batch (x, y) and an unlabeled batch seen as a weak view x_w and two strong
views x_s1, x_s2 (``Batch.views``), plus a second unlabeled batch (``Batch.second``) whose strong views are
pasted into x_s1 and x_s2 by CutMix:

1. the network's own prediction on x_w, without gradient, gives the pseudo-label ŷ and its confidence c
   (the second batch's weak view gives those of the pasted boxes);
2. one forward decodes x and x_w, and x_w's encoder features once more after channel dropout (the
   feature perturbation, ``gta.contract.PerturbedDecoding``): p_x, p_w, p_fp; a second forward gives
   p_s1, p_s2;
3. L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, where L_x is the labeled cross-entropy and each
   unlabeled term is the per-pixel cross-entropy against the (CutMixed) ŷ over the pixels with
   c >= ``conf_thresh``, summed and divided by the number of pixels that are real image (not crop padding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gta.contract import Batch, Method, PerturbedDecoding, Progress, Update, require
from gta.methods.ohem import labeled_cross_entropy

#: the weights of the strong views' terms and of the feature perturbation's in L, and L's divisor
STRONG_WEIGHT, FP_WEIGHT, DIVISOR = 0.25, 0.5, 2.0
#: CutMix boxes: their share of the crop's area and their aspect ratio (height / width), each uniform
BOX_AREA = (0.02, 0.4)
BOX_ASPECT = (0.3, 1 / 0.3)


@dataclass
class Targets:
    """Pseudo-labels of an unlabeled batch: ŷ, c and which pixels are real image (B x H x W each)."""

    label: Tensor
    confidence: Tensor
    valid: Tensor

    def pasted(self, other: Targets, box: Tensor) -> Targets:
        """These targets with ``other``'s inside ``box``, as CutMix pastes the images."""
        return Targets(*(torch.where(box, b, a) for a, b in
                         ((self.label, other.label), (self.confidence, other.confidence), (self.valid, other.valid))))


def cutmix_boxes(batch: int, height: int, width: int, prob: float, device: torch.device) -> Tensor:
    """One box per image (B x H x W, boolean), drawn with probability ``prob`` (else empty): a uniform
    2-40 % of the area, aspect ratio uniform in [0.3, 1/0.3], at a uniformly drawn position where it fits."""
    mixed = torch.rand(batch, device=device) < prob
    area = torch.empty(batch, device=device).uniform_(*BOX_AREA) * height * width
    aspect = torch.empty(batch, device=device).uniform_(*BOX_ASPECT)
    box_h = (area * aspect).sqrt().floor().clamp(1, height)
    box_w = (area / aspect).sqrt().floor().clamp(1, width)
    top = (torch.rand(batch, device=device) * (height - box_h + 1)).floor()
    left = (torch.rand(batch, device=device) * (width - box_w + 1)).floor()
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)

    def inside(coord: Tensor, start: Tensor, size: Tensor) -> Tensor:
        return (coord >= start.view(-1, 1, 1)) & (coord < (start + size).view(-1, 1, 1))

    return inside(rows, top, box_h) & inside(cols, left, box_w) & mixed.view(-1, 1, 1)


def paste(image: Tensor, other: Tensor, box: Tensor) -> Tensor:
    """``image`` with ``other``'s pixels inside ``box`` (B x H x W)."""
    return torch.where(box.unsqueeze(1), other, image)


def unlabeled_loss(logits: Tensor, targets: Targets, conf_thresh: float) -> Tensor:
    """Σ CE(logits, ŷ) over the real pixels with c >= conf_thresh / the number of real pixels."""
    ce = F.cross_entropy(logits.float(), targets.label, reduction="none")
    kept = targets.valid & (targets.confidence >= conf_thresh)
    return torch.where(kept, ce, 0.0).sum() / targets.valid.sum().clamp_min(1)


class UniMatch(Method):
    """One network, trained on labels and on its own pseudo-labels of the weak view (module docstring).
    Its only network is named ``student``, as SupOnly's is.

    ``conf_thresh``: pseudo-labelled pixels less confident do not count; ``cutmix_prob``: the probability
    that a strong view receives a box of the second batch's same view; ``fp_dropout``: the channel dropout
    of the feature perturbation; ``ohem_thresh``: the OHEM labeled loss counts only the pixels whose
    probability of their class is at most this, and at least ``ohem_min_kept`` of the batch's hardest (None:
    the plain cross-entropy). The defaults are the released PASCAL VOC recipe's."""

    reported = "student"
    views = ("strong1", "strong2")
    second_unlabeled = True

    def __init__(
        self,
        model: Callable[[], nn.Module],
        ignore_index: int = 255,
        conf_thresh: float = 0.95,
        cutmix_prob: float = 0.5,
        fp_dropout: float = 0.5,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 200000,
    ) -> None:
        super().__init__()
        self.student = model()
        require(self.student, PerturbedDecoding, "unimatch")
        self.ignore_index, self.conf_thresh, self.cutmix_prob = ignore_index, conf_thresh, cutmix_prob
        self.fp_dropout, self.ohem_thresh, self.ohem_min_kept = fp_dropout, ohem_thresh, ohem_min_kept

    def trained_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def perturb(self, features: Tensor) -> Tensor:
        """The feature perturbation: whole channels dropped with probability ``fp_dropout``."""
        return F.dropout2d(features, self.fp_dropout, training=True)

    @torch.no_grad()
    def predict(self, images: Tensor, padding: Tensor) -> Targets:
        """ŷ and c of the network in eval mode, without gradient."""
        self.student.eval()
        confidence, label = self.student(images).float().softmax(dim=1).max(dim=1)
        return Targets(label, confidence, padding != self.ignore_index)

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        mix = batch.second
        # step 1 for the boxes pasted into the strong views: the second batch's weak view
        mix_targets = self.predict(mix.image, mix.mask)
        b, _, h, w = batch.unlabeled.shape
        boxes = [cutmix_boxes(b, h, w, self.cutmix_prob, batch.unlabeled.device) for _ in self.views]
        strong = [paste(batch.views[v], mix.views[v], box) for v, box in zip(self.views, boxes, strict=True)]

        # step 2: x and x_w decoded as they are and (x_w's part) from perturbed features; the strong views
        self.student.train()
        n = batch.image.shape[0]
        clean, perturbed = self.student.perturbed_forward(torch.cat([batch.image, batch.unlabeled]), self.perturb)
        logits_x, logits_w = clean.split([n, b])
        logits_fp = perturbed[n:]
        logits_s1, logits_s2 = self.student(torch.cat(strong)).chunk(2)

        # step 1 for x_w: from the training forward (as the released code does), detached
        confidence, label = logits_w.detach().float().softmax(dim=1).max(dim=1)
        targets = Targets(label, confidence, batch.unlabeled_mask != self.ignore_index)
        t1, t2 = (targets.pasted(mix_targets, box) for box in boxes)

        # step 3
        loss_x = labeled_cross_entropy(logits_x, batch.mask, self.ignore_index, self.ohem_thresh, self.ohem_min_kept)
        loss_s1 = unlabeled_loss(logits_s1, t1, self.conf_thresh)
        loss_s2 = unlabeled_loss(logits_s2, t2, self.conf_thresh)
        loss_fp = unlabeled_loss(logits_fp, targets, self.conf_thresh)
        loss = (loss_x + STRONG_WEIGHT * (loss_s1 + loss_s2) + FP_WEIGHT * loss_fp) / DIVISOR
        update("student", loss)
        kept = (targets.valid & (confidence >= self.conf_thresh)).sum() / targets.valid.sum().clamp_min(1)
        return {
            "student/loss_l": loss_x.detach(), "student/loss_s1": loss_s1.detach(),
            "student/loss_s2": loss_s2.detach(), "student/loss_fp": loss_fp.detach(), "kept": kept,
        }

    @torch.no_grad()
    def inspect(self, batch: Batch) -> dict[str, Tensor]:
        """ŷ and c on the weak view (in eval mode), and the pixels below the threshold."""
        targets = self.predict(batch.unlabeled, batch.unlabeled_mask)
        return {
            "pseudo-label": torch.where(targets.valid, targets.label, self.ignore_index),
            "confidence": targets.confidence,
            "dropped": targets.valid & (targets.confidence < self.conf_thresh),
        }
