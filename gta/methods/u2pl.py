"""U2PL (Wang et al., CVPR 2022): using unreliable pseudo-labels, as negatives of a per-class contrastive loss.

A teacher (the EMA of the student) pseudo-labels the unlabeled batch; the student has a representation head on
the features its mask predictor reads (``gta.contract.DecoderFeatures``). Per iteration after the warm-up,
with t the share of the run's epochs done (``epoch / epochs``):

1. the teacher, in eval mode, labels x_u (ŷ = argmax); CutMix mixes images and labels (``cutmix_prob``);
2. one student forward over [x_l, x_m] gives logits and representations r; one teacher forward over the same
   images (in train mode, without gradient) gives probabilities p and representations r';
3. L_s: the labeled cross-entropy (or OHEM); L_u: the cross-entropy against ŷ over the *reliable* pixels, those
   whose entropy H(p) lies below the percentile 100 - α_u (1 - t) of the pseudo-labelled pixels' entropies
   (α_u = ``unreliable``), scaled by (all pixels / reliable pixels) as the released loss is;
4. L_c: per class c, anchors are the student's r at reliable pixels of class c (labeled, or pseudo-labelled
   with entropy at or below the α_c (1 - t) percentile, α_c = ``low_entropy``) whose p_c > ``anchor_thresh``;
   the positive is the mean of r' over those reliable pixels; negatives are r' of the *unreliable* pixels
   (entropy at or above the 100 - α_c (1 - t) percentile) where c ranks in [``low_rank``, ``high_rank``) of
   p, and of labeled pixels of another class where c ranks below ``low_rank`` (p_c < ``negative_thresh``),
   kept in a queue per class (``queue_size``; ``background_queue_size`` for class 0), gathered across
   processes; L_c is the mean over classes of InfoNCE over ``queries`` anchors with ``negatives`` negatives
   each drawn from the queue, at temperature ``temperature``;
5. L = L_s + μ L_u + λ_c L_c; the teacher is the EMA of the student (network and representation head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gta.contract import Batch, DecoderFeatures, Progress, Update, require
from gta.methods.base import SelfTraining, follower
from gta.methods.ema import EMA, ema_model_
from gta.methods.ohem import labeled_cross_entropy
from gta.methods.pseudo_label import mixed_predictions
from gta.methods.reweight import Uniform

#: the representation's dimension and the dropout of its head, as the released decoder's
REPRESENTATION_DIM, REPRESENTATION_DROPOUT = 256, 0.1


def representation_head(channels: int) -> nn.Module:
    """The released representation head: two 3x3 convolutions with BatchNorm, ReLU and dropout, then a 1x1."""
    d = REPRESENTATION_DIM
    return nn.Sequential(
        nn.Conv2d(channels, d, 3, padding=1), nn.BatchNorm2d(d), nn.ReLU(), nn.Dropout2d(REPRESENTATION_DROPOUT),
        nn.Conv2d(d, d, 3, padding=1), nn.BatchNorm2d(d), nn.ReLU(), nn.Dropout2d(REPRESENTATION_DROPOUT),
        nn.Conv2d(d, d, 1),
    )


class Memory(nn.Module):
    """A queue of negative keys per class, the newest last, each cut to its size (``size``; ``background_size``
    for class 0), made at the first push, when the number of classes is known. Its state is the queues
    themselves (``get_extra_state``), so a checkpoint holds them and a resumed run draws from the same keys;
    they are no buffers, so neither the teacher's EMA nor the averaging of buffers across processes touches
    them."""

    def __init__(self, size: int, background_size: int) -> None:
        super().__init__()
        self.size, self.background_size = size, background_size
        self.queues: list[Tensor] = []

    def push(self, keys: list[Tensor]) -> None:
        """Append each class's keys (gathered from every process, rank 0's first) to its queue."""
        keys = gather(keys)
        if not self.queues:
            self.queues = [k.new_zeros(0, k.shape[1]) for k in keys]
        for c, new in enumerate(keys):
            size = self.background_size if c == 0 else self.size
            self.queues[c] = torch.cat([self.queues[c].to(new.device), new])[-size:]

    def get_extra_state(self) -> dict[str, Tensor]:
        return {str(c): queue for c, queue in enumerate(self.queues)}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.queues = [state[str(c)] for c in range(len(state))]


def gather(keys: list[Tensor]) -> list[Tensor]:
    """Each class's keys from every process, rank 0's first (``keys`` itself alone): one collective for the
    counts and one for the keys of all classes, padded to the largest count."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    counts = torch.tensor([len(k) for k in keys], device=keys[0].device)
    everyone = [torch.empty_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, counts)
    flat = torch.cat(keys)
    size = int(max(int(c.sum()) for c in everyone))
    padded = torch.cat([flat, flat.new_zeros(size - len(flat), flat.shape[1])])
    gathered = [torch.empty_like(padded) for _ in everyone]
    dist.all_gather(gathered, padded)
    per_rank = [g[: int(c.sum())].split(c.tolist()) for g, c in zip(gathered, everyone, strict=True)]
    return [torch.cat([rank[c] for rank in per_rank]) for c in range(len(keys))]


class WithRepresentation(nn.Module):
    """A network and a representation head on the features its mask predictor reads; ``forward`` is the
    network's (what is evaluated), ``both`` the logits and the representations."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.representation = representation_head(network.feature_channels())

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, features = self.network.forward_features(x)
        return logits, self.representation(features)

    def param_groups(self, decoder_lr_mult: float) -> list[dict]:
        """The network's groups; the representation head, trained from scratch like the decoder, at its rate."""
        head = list(self.representation.parameters())
        return [*self.network.param_groups(decoder_lr_mult),
                {"params": head, "lr_mult": decoder_lr_mult, "name": "representation"}]


class Student(nn.Module):
    """The student (``model``: network and representation head), the teacher's representation head (the EMA of
    the student's, kept here so that the teacher is the plain network that ``eval`` and ``predict`` load) and
    the queues. ``forward`` and ``param_groups`` are the model's."""

    def __init__(self, network: nn.Module, memory: Memory) -> None:
        super().__init__()
        self.model = WithRepresentation(network)
        self.teacher_representation = follower(self.model.representation)
        self.memory = memory

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def param_groups(self, decoder_lr_mult: float) -> list[dict]:
        return self.model.param_groups(decoder_lr_mult)


def entropy(probs: Tensor) -> Tensor:
    return -(probs * (probs + 1e-10).log()).sum(dim=1)


def percentile(values: Tensor, percent: float) -> Tensor:
    """np.percentile's linear interpolation, as the released code computes its thresholds."""
    return torch.quantile(values.float(), percent / 100)


class U2PL(SelfTraining):
    """Teacher-student self-training on the reliable pixels, and a contrastive loss whose negatives are the
    unreliable ones (module docstring). ``unsup_weight``: μ; ``contrastive_weight``: λ_c; ``warmup_epochs``,
    ``cutmix_prob``, ``ignore_index``: as ``SelfTraining``'s; ``ohem_thresh`` / ``ohem_min_kept``: the labeled
    loss's hard pixels (``gta.methods.ohem``; None: the plain cross-entropy). The defaults are the released PASCAL VOC
    configuration's, the labeled loss aside (its OHEM is the recipe's, conf/method_recipe/u2pl/)."""

    def __init__(
        self,
        model: Callable[[], nn.Module],
        ema: EMA,
        ignore_index: int = 255,
        unsup_weight: float = 1.0,
        warmup_epochs: int = 1,
        cutmix_prob: float = 0.5,
        contrastive_weight: float = 1.0,
        unreliable: float = 20.0,
        low_entropy: float = 20.0,
        low_rank: int = 3,
        high_rank: int = 20,
        anchor_thresh: float = 0.3,
        negative_thresh: float = 1.0,
        queries: int = 256,
        negatives: int = 50,
        temperature: float = 0.5,
        queue_size: int = 30000,
        background_queue_size: int = 50000,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 100000,
    ) -> None:
        self.queue_size, self.background_queue_size = queue_size, background_queue_size
        super().__init__(model, ema, Uniform(), ignore_index, 0.0, unsup_weight, warmup_epochs, cutmix_prob)
        self.contrastive_weight, self.unreliable, self.low_entropy = contrastive_weight, unreliable, low_entropy
        self.low_rank, self.high_rank = low_rank, high_rank
        self.anchor_thresh, self.negative_thresh = anchor_thresh, negative_thresh
        self.queries, self.negatives, self.temperature = queries, negatives, temperature
        self.ohem_thresh, self.ohem_min_kept = ohem_thresh, ohem_min_kept

    def make_student(self, network: nn.Module) -> nn.Module:
        require(network, DecoderFeatures, "u2pl")
        return Student(network, Memory(self.queue_size, self.background_queue_size))

    @property
    def student_network(self) -> nn.Module:
        """The network alone: what the teacher copies and averages (its representation head has its own EMA)."""
        return self.student.model.network

    def trained_models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "student": self.student}

    @torch.no_grad()
    def hand_over(self) -> None:
        super().hand_over()
        self.student.teacher_representation.load_state_dict(self.student.model.representation.state_dict())

    def semi_supervised_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        t = progress.epoch / progress.epochs
        # step 1: the teacher's pseudo-labels of the un-mixed images, then CutMix
        image, _, label, valid = mixed_predictions(
            self.teacher, batch.unlabeled, batch.unlabeled_mask, self.cutmix_prob, self.ignore_index)
        label = torch.where(valid, label, self.ignore_index)

        # step 2: the student's and the teacher's forwards over the labeled and the mixed images
        images, n = torch.cat([batch.image, image]), batch.image.shape[0]
        self.student.train()
        logits, rep = self.student.model.both(images)
        with torch.no_grad():
            self.teacher.train(), self.student.teacher_representation.train()
            teacher_logits, features = self.teacher.forward_features(images)
            teacher_rep = self.student.teacher_representation(features)
            probs = teacher_logits.float().softmax(dim=1)

        # step 3: L_s and L_u on the reliable pixels
        loss_l = labeled_cross_entropy(logits[:n], batch.mask, self.ignore_index, self.ohem_thresh, self.ohem_min_kept)
        loss_u, reliable = self.unlabeled_loss(logits[n:], label, entropy(probs[n:]), self.unreliable * (1 - t))

        # step 4: L_c with the unreliable pixels as negatives
        loss_c = self.contrastive_loss(rep, teacher_rep, probs, torch.cat([batch.mask, label]), n,
                                       self.low_entropy * (1 - t))

        update("student", loss_l + self.unsup_weight * loss_u + self.contrastive_weight * loss_c)
        decay = self.ema.decay(self.since_hand_over(progress))
        ema_model_(self.teacher, self.student_network, decay)
        ema_model_(self.student.teacher_representation, self.student.model.representation, decay)
        return {"student/loss_l": loss_l.detach(), "student/loss_u": loss_u.detach(),
                "student/loss_c": loss_c.detach(), "kept": reliable.float().mean()}

    def unlabeled_loss(self, logits: Tensor, label: Tensor, uncertainty: Tensor, percent: float) -> tuple[Tensor, Tensor]:
        """L_u over the pixels whose entropy is below the (100 - ``percent``)-th percentile of the
        pseudo-labelled ones', times (all pixels / those pixels), as the released loss; and those pixels."""
        labeled = label != self.ignore_index
        if not labeled.any():
            return logits.sum() * 0.0, labeled
        reliable = labeled & (uncertainty < percentile(uncertainty[labeled], 100 - percent))
        count = reliable.sum().clamp_min(1)
        ce = F.cross_entropy(logits.float(), torch.where(reliable, label, self.ignore_index),
                             ignore_index=self.ignore_index, reduction="sum")
        return ce / count * (label.numel() / count), reliable

    def contrastive_loss(self, rep: Tensor, teacher_rep: Tensor, probs: Tensor, labels: Tensor, n: int,
                         percent: float) -> Tensor:
        """L_c (step 4) on the representations' grid: labels, masks and probabilities taken there by nearest
        neighbour. ``labels``: the labeled batch's ground truth, then the unlabeled batch's pseudo-labels."""
        size = rep.shape[-2:]
        has_label = labels != self.ignore_index
        uncertainty = entropy(probs[n:])
        low, high = has_label.clone(), has_label.clone()
        pseudo = has_label[n:]
        if pseudo.any():
            values = uncertainty[pseudo]
            low[n:] = pseudo & (uncertainty <= percentile(values, percent))
            high[n:] = pseudo & (uncertainty >= percentile(values, 100 - percent))

        def small(x: Tensor) -> Tensor:
            return F.interpolate(x.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)

        labels, low, high = small(labels).long(), small(low).bool(), small(high).bool()
        probs = F.interpolate(probs, size=size, mode="nearest")
        rank = probs.argsort(dim=1, descending=True).argsort(dim=1)  # rank[:, c]: c's place in p, 0 the most probable
        rep, teacher_rep = rep.permute(0, 2, 3, 1).float(), teacher_rep.permute(0, 2, 3, 1).float()
        unlabeled = torch.zeros_like(low)
        unlabeled[n:] = True

        anchors, positives, keys = [], [], []
        for c in range(probs.shape[1]):
            reliable = low & (labels == c)
            confusing = torch.where(unlabeled, (rank[:, c] >= self.low_rank) & (rank[:, c] < self.high_rank),
                                    (rank[:, c] < self.low_rank) & (labels != c))
            keys.append(teacher_rep[high & confusing & (probs[:, c] < self.negative_thresh)])
            if reliable.any():
                anchors.append(rep[reliable & (probs[:, c] > self.anchor_thresh)])
                positives.append((c, teacher_rep[reliable].mean(dim=0)))
        self.student.memory.push(keys)  # the batch's keys join the queues before they are drawn from
        if len(positives) <= 1:  # one class or none in the batch: nothing to contrast
            return rep.sum() * 0.0
        loss = rep.sum() * 0.0
        for candidates, (c, positive) in zip(anchors, positives, strict=True):
            queue = self.student.memory.queues[c]
            if len(candidates) == 0 or len(queue) == 0:
                continue
            anchor = candidates[torch.randint(len(candidates), (self.queries,), device=rep.device)]
            drawn = queue[torch.randint(len(queue), (self.queries * self.negatives,), device=queue.device)]
            keys_c = torch.cat([positive.expand(self.queries, 1, -1),
                                drawn.to(rep.device).view(self.queries, self.negatives, -1)], dim=1)
            similarity = F.cosine_similarity(anchor.unsqueeze(1), keys_c, dim=2) / self.temperature
            loss = loss + F.cross_entropy(similarity, similarity.new_zeros(self.queries, dtype=torch.long))
        return loss / len(positives)

    @torch.no_grad()
    def inspect(self, batch: Batch) -> dict[str, Tensor]:
        """The teacher's pseudo-labels of the un-mixed images (in eval mode) and their entropy."""
        self.teacher.eval()
        probs = self.teacher(batch.unlabeled).float().softmax(dim=1)
        valid = batch.unlabeled_mask != self.ignore_index
        return {"pseudo-label": torch.where(valid, probs.argmax(dim=1), self.ignore_index),
                "entropy": torch.where(valid, entropy(probs), 0.0)}
