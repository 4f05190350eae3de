"""ST++ (Yang et al., CVPR 2022): self-training with a supervised teacher, selective re-training on the
images whose predictions were stable while the teacher learned, strong augmentation on pseudo-labeled images.

The run is cut into three stages of equal length (the last takes the remainder), each training a fresh
network from the model factory with its own learning-rate schedule (``scheduled_span``):

1. the teacher learns from the labeled images alone; its weights after 1/3 and 2/3 of the stage are kept
   (its final weights are the 3/3 one);
2. for each unlabeled image, its weak view is predicted (in eval mode) by the three checkpoints; its
   stability s is the mean over the first two of the mIoU between their prediction and the final one's
   (each class present in either counting, over the pixels that are real image). The most stable half
   (``select``) of each unlabeled batch, as it arrives (the released code ranks the whole set at once,
   which the contract's one batch at a time does not allow), are pseudo-labeled by the teacher, and the
   student learns, in one forward, from the labeled images and the selected images' strong view (colour
   jitter, grayscale, blur: ``Batch.views``; CutOut here: a box filled with the mean, its pixels unlabeled);
3. the final network learns in the same way from every unlabeled image: the stable ones keep the teacher's
   pseudo-labels, the others take the student's.

Every loss is the cross-entropy averaged over the labeled and pseudo-labeled pixels of the batch together.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gta.contract import Batch, Method, Progress, Update
from gta.methods.base import follower
from gta.methods.unimatch import cutmix_boxes

#: the networks of the three stages, in order
STAGES = ("teacher", "student", "final")


def stage_bounds(total: int | None) -> tuple[int, int]:
    """The iterations at which stages 2 and 3 start in a run of ``total``."""
    if total is None or total < len(STAGES):
        raise ValueError(f"ST++ runs three stages: it needs a run of at least 3 iterations, got {total}")
    length = total // len(STAGES)
    return length, 2 * length


def stability(predictions: list[Tensor], final: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """s per image (B): the mean over ``predictions`` (each B x H x W) of their mIoU with ``final`` on the
    ``valid`` pixels, over the classes present in either (a class in neither does not count)."""
    target = F.one_hot(final, num_classes) & valid.unsqueeze(-1)
    scores = []
    for label in predictions:
        predicted = F.one_hot(label, num_classes) & valid.unsqueeze(-1)
        inter = (predicted & target).sum(dim=(1, 2))
        union = (predicted | target).sum(dim=(1, 2))
        iou = inter / union.clamp_min(1)
        scores.append(iou.sum(dim=1) / (union > 0).sum(dim=1).clamp_min(1))
    return torch.stack(scores).mean(dim=0)


def most_stable(score: Tensor, share: float) -> Tensor:
    """The ceil(share * B) images of highest ``score`` (B, boolean); ties go to the earlier image."""
    chosen = score.argsort(descending=True, stable=True)[: math.ceil(share * score.numel())]
    return torch.zeros_like(score, dtype=torch.bool).index_fill_(0, chosen, True)


def cutout(image: Tensor, label: Tensor, prob: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """CutOut: with probability ``prob`` per image, a box (UniMatch's CutMix box: 2-40 % of the area, aspect
    0.3-1/0.3) of the image set to the mean (0 after normalisation) and of its label to ``ignore_index``."""
    b, _, h, w = image.shape
    box = cutmix_boxes(b, h, w, prob, image.device)
    return image.masked_fill(box.unsqueeze(1), 0.0), label.masked_fill(box, ignore_index)


class STPlusPlus(Method):
    """ST++ (module docstring): ``teacher``, ``student`` and ``final``, one per stage; the reported model is
    the one the current stage trains. The teacher's checkpoints ``checkpoint1`` and ``checkpoint2`` (1/3,
    2/3) are evaluated too.

    ``select``: the share of each unlabeled batch that stage 2 selects, the most stable; ``cutout_prob``: the
    probability of CutOut on a pseudo-labeled image. The defaults are the released recipe's."""

    reported = "final"
    views = ("strong1",)

    def __init__(
        self,
        model: Callable[[], nn.Module],
        ignore_index: int = 255,
        select: float = 0.5,
        cutout_prob: float = 0.5,
    ) -> None:
        super().__init__()
        self.teacher, self.student, self.final = model(), model(), model()
        #: the teacher's weights after 1/3 and 2/3 of stage 1
        self.checkpoint1, self.checkpoint2 = follower(self.teacher), follower(self.teacher)
        self.ignore_index, self.select, self.cutout_prob = ignore_index, select, cutout_prob

    def trained_models(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in STAGES}

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"checkpoint1": self.checkpoint1, "checkpoint2": self.checkpoint2} | self.trained_models()

    def stage(self, progress: Progress) -> str:
        """The network that iteration ``progress.iteration`` trains: its stage's."""
        return STAGES[sum(progress.iteration >= start for start in stage_bounds(progress.total))]

    def reported_at(self, progress: Progress) -> str:
        # an evaluation after ``iteration`` steps reports the network that the last of them trained
        return self.stage(Progress(max(progress.iteration - 1, 0), progress.iters_per_epoch, progress.total))

    def scheduled_span(self, name: str, total: int) -> tuple[int, int]:
        starts = (0, *stage_bounds(total), total)
        index = STAGES.index(name)
        return starts[index], starts[index + 1]

    def training_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        name = self.stage(progress)
        if name == "teacher":
            return self.supervised_step(batch, progress, update)
        label, stable = self.pseudo_labels(batch, with_student=name == "final")
        image, label = cutout(batch.views["strong1"], label, self.cutout_prob, self.ignore_index)
        keep = stable if name == "student" else torch.ones_like(stable)
        network = getattr(self, name)
        network.train()
        logits = network(torch.cat([batch.image, image[keep]]))
        loss = F.cross_entropy(logits.float(), torch.cat([batch.mask, label[keep]]), ignore_index=self.ignore_index)
        update(name, loss)
        return {f"{name}/loss": loss.detach(), "stable": stable.float().mean()}

    def supervised_step(self, batch: Batch, progress: Progress, update: Update) -> dict[str, Tensor]:
        """Stage 1; ``checkpoint<k>`` becomes the teacher after k/3 of the stage's updates (k = 1, 2)."""
        length = stage_bounds(progress.total)[0]
        for k, checkpoint in enumerate((self.checkpoint1, self.checkpoint2), start=1):
            if progress.iteration == k * length // 3:
                checkpoint.load_state_dict(self.teacher.state_dict())
        loss = self.labeled_loss(self.teacher, batch)
        update("teacher", loss)
        return {"teacher/loss": loss.detach()}

    @torch.no_grad()
    def pseudo_labels(self, batch: Batch, with_student: bool) -> tuple[Tensor, Tensor]:
        """ŷ of the weak view (ignore index on crop padding) and which images are the most stable: the
        teacher labels those, and the others too unless ``with_student``, where the student labels them."""
        valid = batch.unlabeled_mask != self.ignore_index
        logits = []
        for network in (self.checkpoint1, self.checkpoint2, self.teacher):
            network.eval()
            logits.append(network(batch.unlabeled))
        *earlier, label = (x.argmax(dim=1) for x in logits)
        stable = most_stable(stability(earlier, label, valid, logits[-1].shape[1]), self.select)
        if with_student:
            self.student.eval()
            label = torch.where(stable.view(-1, 1, 1), label, self.student(batch.unlabeled).argmax(dim=1))
        return torch.where(valid, label, self.ignore_index), stable

    @torch.no_grad()
    def inspect(self, batch: Batch) -> dict[str, Tensor]:
        """The teacher's pseudo-label of the weak view and the real pixels of the images selected as stable."""
        label, stable = self.pseudo_labels(batch, with_student=False)
        return {"pseudo-label": label, "stable": (label != self.ignore_index) & stable.view(-1, 1, 1)}
