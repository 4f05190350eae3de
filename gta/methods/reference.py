"""Where the released GTA-Seg training code differs from the paper (ALGORITHM.md §5), as switches.

Every switch is off by default (the paper's behaviour); ``variant=gta_reference`` turns them all on.
The released code's EMA decay (§5.6, 0.999) is ``ema.alpha``; its data-pipeline differences are
``dataset.pad_label`` (§5.8) and ``dataset.scale_pivot`` (§5.10).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reference:
    #: §5.1 after the first semi-supervised epoch the student's and the assistant's classifier are one
    #: tensor, trained by both optimisers (on ground truth and on pseudo-labels)
    shared_classifier: bool = False
    #: §5.2 all through the first semi-supervised epoch, teacher and assistant are the student's tensors,
    #: so that epoch is plain self-training of the student
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
    #: §5.9 warm-up trains the student only; teacher and assistant run forwards, then copy it
    warmup_student_only: bool = False


@torch.no_grad()
def share_(targets: Iterable[torch.Tensor], sources: Iterable[torch.Tensor]) -> None:
    """Make each target the same storage as its source (the released code's ``.data`` assignment):
    from then on, a step of either model's optimiser moves both."""
    for t, s in zip(targets, sources, strict=True):
        if t.data_ptr() != s.data_ptr():
            t.data = s.data


@torch.no_grad()
def unshare_(targets: Iterable[torch.Tensor], sources: Iterable[torch.Tensor]) -> None:
    """Give each target that shares its source's storage a copy of its own."""
    for t, s in zip(targets, sources, strict=True):
        if t.data_ptr() == s.data_ptr():
            t.data = s.data.clone()


@torch.no_grad()
def copy_(targets: Iterable[torch.Tensor], sources: Iterable[torch.Tensor]) -> None:
    for t, s in zip(targets, sources, strict=True):
        t.copy_(s)
