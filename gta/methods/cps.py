"""CPS (Chen et al., CVPR 2021): cross pseudo supervision between two networks, with CutMix.

Two networks of one architecture, each made by its own call of the model factory, so that what is drawn at
random (the decoder) starts differently in each. Per iteration, for a labeled batch (x, y) and two unlabeled
batches x_u and x'_u (``Batch.second``):

1. boxes M are drawn per image, and x_m = (1 - M) x_u + M x'_u is the mixed image;
2. each network k, without gradient, predicts x_u and x'_u; its pseudo-label of x_m is the argmax mixed
   with the same boxes, ŷ_k = (1 - M) argmax p_k(x_u) + M argmax p_k(x'_u) (crop padding: no label);
3. L = L_sup(1) + L_sup(2) + λ (CE(p_1(x_m), ŷ_2) + CE(p_2(x_m), ŷ_1)), each CE the mean over the labeled
   pixels.

A pseudo-label is an argmax and carries no gradient, so L is the sum of L_1 = L_sup(1) + λ CE(p_1(x_m), ŷ_2),
which depends on network 1 alone, and L_2, on network 2 alone: one ``update`` of each gives each network
the gradient of L.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gta.contract import Batch, Method, Progress, Update
from gta.methods.ohem import labeled_cross_entropy
from gta.methods.unimatch import paste


def box_masks(batch: int, height: int, width: int, boxes: int, area: Sequence[float], device: torch.device) -> Tensor:
    """The CutMix masks of a batch (B x H x W, boolean), as CutMix-Seg's box generator draws them: a share
    of the crop s uniform in ``area`` is split evenly over the n = ``boxes`` boxes; each box has height
    H s_h / sqrt(n) and width W s_w / sqrt(n), where s_h = s^u (u uniform in [0, 1]) and s_w = s / s_h, at a
    uniform position inside the crop; a pixel is in the mask when an odd number of boxes cover it."""
    share = torch.empty(batch, boxes, device=device).uniform_(*area)
    share_h = share.pow(torch.rand(batch, boxes, device=device))
    share_w = share / share_h
    box_h = (share_h * height / boxes**0.5).round()
    box_w = (share_w * width / boxes**0.5).round()
    top = ((height - box_h) * torch.rand(batch, boxes, device=device)).round()
    left = ((width - box_w) * torch.rand(batch, boxes, device=device)).round()
    rows = torch.arange(height, device=device).view(1, 1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, 1, width)

    def inside(coord: Tensor, start: Tensor, size: Tensor) -> Tensor:
        start, size = start.view(batch, boxes, 1, 1), size.view(batch, boxes, 1, 1)
        return (coord >= start) & (coord < start + size)

    covered = inside(rows, top, box_h) & inside(cols, left, box_w)
    return covered.sum(dim=1) % 2 == 1


class CPS(Method):
    """Two networks, ``net1`` and ``net2``, each supervised by the other's pseudo-labels (module docstring);
    ``net1`` is the reported model, as the released evaluation takes the first branch.

    ``cps_weight``: λ; ``boxes`` and ``box_area``: the CutMix boxes per image and the range of the share of
    the crop they cover together; ``ohem_thresh`` / ``ohem_min_kept``: the labeled loss counts only the hard
    pixels (``gta.methods.ohem``; None: the plain cross-entropy). The
    defaults are the released PASCAL VOC recipe's (CPS + CutMix)."""

    reported = "net1"
    second_unlabeled = True

    def __init__(
        self,
        model: Callable[[], nn.Module],
        ignore_index: int = 255,
        cps_weight: float = 1.0,
        boxes: int = 3,
        box_area: Sequence[float] = (0.25, 0.5),
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 100000,
    ) -> None:
        super().__init__()
        self.net1, self.net2 = model(), model()
        self.ignore_index, self.cps_weight = ignore_index, cps_weight
        self.boxes, self.box_area = boxes, tuple(box_area)
        self.ohem_thresh, self.ohem_min_kept = ohem_thresh, ohem_min_kept

    def trained_models(self) -> dict[str, nn.Module]:
        return {"net1": self.net1, "net2": self.net2}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"net1": self.net1, "net2": self.net2}

    @torch.no_grad()
    def pseudo_label(self, network: nn.Module, batch: Batch, box: Tensor) -> Tensor:
        """Step 2: ŷ of ``network`` for the mixed image, each part from the image it was cut from (the
        network in train mode, as every forward of the released code)."""
        label = network(batch.unlabeled).argmax(dim=1)
        other = network(batch.second.image).argmax(dim=1)
        padding = torch.where(box, batch.second.mask, batch.unlabeled_mask) == self.ignore_index
        return torch.where(padding, self.ignore_index, torch.where(box, other, label))

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        # step 1: the boxes and the mixed image
        b, _, h, w = batch.unlabeled.shape
        box = box_masks(b, h, w, self.boxes, self.box_area, batch.unlabeled.device)
        mixed = paste(batch.unlabeled, batch.second.image, box)

        # step 2: each network's pseudo-labels of the mixed image
        self.net1.train(), self.net2.train()
        label1, label2 = self.pseudo_label(self.net1, batch, box), self.pseudo_label(self.net2, batch, box)

        # step 3: each network learns from the labels and from the other's pseudo-labels
        stats = {}
        for name, network, target in (("net1", self.net1, label2), ("net2", self.net2, label1)):
            loss_cps = F.cross_entropy(network(mixed).float(), target, ignore_index=self.ignore_index)
            loss_sup = labeled_cross_entropy(network(batch.image), batch.mask, self.ignore_index, self.ohem_thresh,
                                             self.ohem_min_kept)
            update(name, loss_sup + self.cps_weight * loss_cps)
            stats |= {f"{name}/loss_l": loss_sup.detach(), f"{name}/loss_cps": loss_cps.detach()}
        agree = (label1 == label2) & (label1 != self.ignore_index)
        return stats | {"agree": agree.sum() / (label1 != self.ignore_index).sum().clamp_min(1)}

    @torch.no_grad()
    def inspect(self, batch: Batch) -> dict[str, Tensor]:
        """Each network's pseudo-label of the un-mixed images (in eval mode) and where they differ."""
        valid = batch.unlabeled_mask != self.ignore_index
        labels = []
        for network in (self.net1, self.net2):
            network.eval()
            labels.append(torch.where(valid, network(batch.unlabeled).argmax(dim=1), self.ignore_index))
        return {"pseudo-label net1": labels[0], "pseudo-label net2": labels[1],
                "disagree": valid & (labels[0] != labels[1])}
