"""ST++ pinned down stage by stage: the three stages and their schedules, the teacher's checkpoints at 1/3
and 2/3 of stage 1, the stability score and the selection of the most stable half, a hand-computed iteration
of stages 2 and 3, CutOut, exact resume inside a stage, the command.

The hand-computed iterations run on ``Affine`` networks, logits = w x + b for two-class images whose channels
are the classes: a bias moves the pixels of small margin to the other class, so checkpoints that disagree
with the teacher on some images only are a one-line change."""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial

import pytest
import torch
from helpers import SPLIT, contract_trainer, make_batch, snapshot, stopped_and_resumed, tiny
from tiny import TinySegmenter
from torch import nn

from gta.contract import Batch, Progress
from gta.data import build_loaders, select_split
from gta.data.config import ViewConfig
from gta.data.transforms import photometric_view
from gta.methods import STPlusPlus
from gta.methods.st_pp import cutout, most_stable, stability

LN = math.log


class Affine(nn.Module):
    """Logits = w x + b (the image's channels are the classes)."""

    def __init__(self, w: float, b: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b).view(1, 2, 1, 1))

    def forward(self, x):
        return self.w * x + self.b


def pixels(*logits: tuple[float, float]) -> torch.Tensor:
    """A 1 x 2 x 1 x N image of two-class values, one pair per pixel."""
    return torch.tensor(logits, dtype=torch.float32).T.reshape(1, 2, 1, len(logits))


def method(teacher=1.0, student=1.0, final=1.0, checkpoint1=(0.0, 1.0), checkpoint2=(0.0, 0.0)) -> STPlusPlus:
    """Teacher, student and final network Affine(w); the checkpoints are the teacher with the biases given."""
    weights = iter([teacher, student, final])
    m = STPlusPlus(lambda: Affine(next(weights)), ignore_index=255, select=0.5, cutout_prob=0.0)
    for checkpoint, bias in ((m.checkpoint1, checkpoint1), (m.checkpoint2, checkpoint2)):
        checkpoint.b.copy_(torch.tensor(bias).view(1, 2, 1, 1))
    return m


# the hand-computed example, total 6 iterations: stages start at 2 and 4. Unlabeled images B then A.
# Teacher (w 1): B (0, 0), A (0, 1). Checkpoint 1 adds 1 to class 1: B's first pixel flips, (1, 0): class 0's
# IoU 1/2, class 1's 0, mIoU 1/4; A's margins are 2, (0, 1) again, mIoU 1. Checkpoint 2 is the teacher.
# s_B = (1/4 + 1) / 2 = 5/8, s_A = (1 + 1) / 2 = 1: A is the stable half.
WEAK = torch.cat([pixels((0.5, 0.0), (2.0, 0.0)), pixels((2.0, 0.0), (0.0, 2.0))])
# the strong view: the network's p(0) = 3/4 at every pixel; so CE is ln 4/3 against class 0, ln 4 against 1
STRONG = torch.cat([pixels((LN(3), 0.0), (LN(3), 0.0))] * 2)
X_L, Y_L = pixels((LN(3), 0.0), (LN(3), 0.0)), torch.tensor([[[0, 0]]])  # CE ln 4/3 at each pixel


def batch(padding=None) -> Batch:
    padding = torch.zeros(2, 1, 2, dtype=torch.long) if padding is None else padding
    return Batch(X_L, Y_L, WEAK, padding, {"strong1": STRONG})


def step(m: STPlusPlus, iteration: int, b: Batch | None = None, total: int = 6) -> tuple[dict, dict]:
    seen = {}
    stats = m.training_step(b or batch(), Progress(iteration, 1, total), lambda name, loss: seen.setdefault(name, loss))
    return seen, stats


def test_stability_is_the_mean_miou_with_the_final_prediction_over_present_classes_and_real_pixels():
    final = torch.tensor([[[0, 0, 1, 1]]])
    # class 0: inter 2, union 3 -> 2/3; class 1: inter 1, union 2 -> 1/2; class 2: in neither, not counted
    first = torch.tensor([[[0, 0, 0, 1]]])
    assert stability([first], final, torch.ones(1, 1, 4, dtype=torch.bool), 3).item() == pytest.approx(7 / 12)
    # with the prediction itself: 1; the mean over the two
    assert stability([first, final], final, torch.ones(1, 1, 4, dtype=torch.bool), 3).item() == pytest.approx(19 / 24)
    # the last pixel is padding: class 0 2/3, class 1 (the final prediction's alone) 0
    valid = torch.tensor([[[True, True, True, False]]])
    assert stability([first], final, valid, 3).item() == pytest.approx(1 / 3)


def test_the_most_stable_half_rounded_up_ties_to_the_earlier():
    assert most_stable(torch.tensor([0.2, 0.9, 0.5, 0.7]), 0.5).tolist() == [False, True, False, True]
    assert most_stable(torch.tensor([0.2, 0.9, 0.5]), 0.5).tolist() == [False, True, True]
    assert most_stable(torch.tensor([0.5, 0.5]), 0.5).tolist() == [True, False]


def test_three_stages_each_with_its_network_its_schedule_and_its_report():
    m = method()
    assert [m.stage(Progress(i, 1, 10)) for i in range(10)] == ["teacher"] * 3 + ["student"] * 3 + ["final"] * 4
    assert [m.scheduled_span(name, 10) for name in ("teacher", "student", "final")] == [(0, 3), (3, 6), (6, 10)]
    # an evaluation after k iterations reports the network the k-th trained
    assert [m.reported_at(Progress(k, 1, 10)) for k in (0, 3, 4, 6, 7, 10)] == [
        "teacher", "teacher", "student", "student", "final", "final"]
    assert set(m.evaluated_models()) == {"checkpoint1", "checkpoint2", "teacher", "student", "final"}
    with pytest.raises(ValueError, match="at least 3 iterations"):
        m.stage(Progress(0, 1, 2))


def test_stage_one_keeps_the_teachers_weights_at_one_and_two_thirds():
    """Stage 1 of 9 iterations is 3 long: checkpoint 1 holds the teacher after 1 update, checkpoint 2 after 2."""
    m = STPlusPlus(lambda: Affine(0.0), cutout_prob=0.0)
    names = []

    def update(name, loss):
        names.append(name)
        with torch.no_grad():
            m.teacher.w += 1

    for iteration in range(3):
        m.training_step(batch(), Progress(iteration, 1, 9), update)
    assert names == ["teacher"] * 3
    assert (m.checkpoint1.w.item(), m.checkpoint2.w.item(), m.teacher.w.item()) == (1.0, 2.0, 3.0)


def test_stage_one_is_the_labeled_cross_entropy_of_the_teacher():
    losses, stats = step(method(), 0)
    assert list(losses) == ["teacher"] and losses["teacher"].item() == pytest.approx(LN(4 / 3))


def test_a_hand_computed_iteration_of_stage_two():
    """The student learns from x_l and the strong view of A alone, labeled by the teacher on A's weak view
    (0, 1), one cross-entropy over the four pixels."""
    losses, stats = step(method(), 2)
    assert list(losses) == ["student"]
    assert losses["student"].item() == pytest.approx((3 * LN(4 / 3) + LN(4)) / 4)
    assert stats["stable"].item() == 0.5
    # checkpoints equal to the teacher: B and A equally stable, B the earlier, selected; its labels (0, 0)
    losses, _ = step(method(checkpoint1=(0.0, 0.0)), 2)
    assert losses["student"].item() == pytest.approx(LN(4 / 3))


def test_a_hand_computed_iteration_of_stage_three():
    """The final network learns from every unlabeled image: A with the teacher's labels (0, 1), B with the
    student's (w -1: (1, 1); the teacher's would be (0, 0)), one cross-entropy over the six pixels."""
    losses, stats = step(method(student=-1.0), 4)
    assert list(losses) == ["final"]
    assert losses["final"].item() == pytest.approx((3 * LN(4 / 3) + 3 * LN(4)) / 6)


def test_crop_padding_carries_no_label_and_no_stability():
    """A's second pixel is padding: its label (1) leaves the loss; B's first pixel is padding, so B agrees
    with the teacher (mIoU 1) and is as stable as A: the earlier, B, is selected."""
    padding = torch.tensor([[[0, 0]], [[0, 255]]])
    losses, _ = step(method(), 2, batch(padding))
    assert losses["student"].item() == pytest.approx(LN(4 / 3))  # x_l's and A's first pixel, both class 0
    padding = torch.tensor([[[255, 0]], [[0, 0]]])
    losses, _ = step(method(), 2, batch(padding))
    assert losses["student"].item() == pytest.approx(LN(4 / 3))  # x_l and B's second pixel


def test_cutout_blanks_a_box_of_the_image_and_unlabels_it():
    torch.manual_seed(0)
    image, label = torch.rand(8, 3, 16, 16) + 1, torch.zeros(8, 16, 16, dtype=torch.long)
    assert torch.equal(cutout(image, label, 0.0, 255)[0], image)  # never with probability 0
    cut, cut_label = cutout(image, label, 1.0, 255)
    box = cut_label == 255
    assert box.flatten(1).any(1).all()  # every image has its box
    cut, image = cut.permute(1, 0, 2, 3), image.permute(1, 0, 2, 3)  # channels first: a pixel mask picks all three
    assert (cut[:, box] == 0).all() and torch.equal(cut[:, ~box], image[:, ~box])


def test_inspect_shows_the_teachers_pseudo_label_and_the_stable_images_and_changes_nothing():
    torch.manual_seed(0)
    m = STPlusPlus(partial(TinySegmenter, 3))
    m.checkpoint1.head.weight.data.neg_()  # a checkpoint that disagrees with the teacher
    b = make_batch()
    b.unlabeled_mask[:, :, 6:] = 255  # two columns of crop padding
    before = snapshot(m.state_dict().values())
    rng = torch.get_rng_state()
    maps = m.inspect(b)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(m.state_dict().values()), strict=True))
    label, stable = maps["pseudo-label"], maps["stable"]
    padding = b.unlabeled_mask == 255
    assert (label[padding] == 255).all() and not stable[padding].any()
    m.teacher.eval()
    assert torch.equal(label[~padding], m.teacher(b.unlabeled).argmax(dim=1)[~padding])
    assert stable.flatten(1).any(1).tolist().count(True) == 1  # one image of two: the most stable half


# --- through the engine: exact resume, each stage's schedule -------------------------------------------------

ITERS = 6  # 2 iterations a stage


def trainer(source, run_dir, logger=None):
    """ST++ on the tiny network for ITERS iterations of 2 + 2 images with a strong view."""
    strong = photometric_view(**{k: v for k, v in asdict(ViewConfig()).items() if k != "_target_"})
    loaders = build_loaders(source, select_split(source, SPLIT), 2, 0, seed=0, need_unlabeled=True,
                            views={"strong1": strong})
    torch.manual_seed(0)
    method = STPlusPlus(partial(TinySegmenter, 6), 255)
    return contract_trainer(source, loaders, method, run_dir, logger, iters=ITERS)


@pytest.mark.parametrize("stop_at", [1, 3])
def test_a_stopped_run_resumes_exactly(source, tmp_path, stop_at):
    """Stopped inside stage 1 (between the checkpoints) or stage 2, every network, checkpoint and optimiser
    ends as uninterrupted, and the logs after the stop are the same."""
    _, resumed = stopped_and_resumed(partial(trainer, source), tmp_path, stop_at)
    assert resumed.reported == "final"


def test_each_stage_runs_the_schedule_from_its_start(source, tmp_path):
    """Each fresh network starts at the base learning rate; the one before it has finished its schedule."""
    run = trainer(source, tmp_path / "run")
    run.fit()
    logged = run.logger.metrics
    assert [logged[step]["lr/teacher"] for step in (1, 2)] == pytest.approx([0.05, 0.05 * 0.5**0.9])
    assert [logged[step]["lr/student"] for step in (3, 4)] == pytest.approx([0.05, 0.05 * 0.5**0.9])
    assert [logged[step]["lr/final"] for step in (5, 6)] == pytest.approx([0.05, 0.05 * 0.5**0.9])
    assert logged[3]["lr/teacher"] == 0.0 and logged[5]["lr/student"] == 0.0
    assert "train/student/loss" in logged[3] and "train/final/loss" in logged[5]


@pytest.mark.slow
def test_python_m_gta_train_method_st_pp(tmp_path):
    from helpers import gta

    result = gta("train", "method=st_pp", *tiny(tmp_path / "data", iters=3), f"hydra.run.dir={tmp_path / 'run'}")
    assert "STPlusPlus on SyntheticShapes" in result.stdout and "val mIoU final" in result.stdout
    assert "<- reported" in result.stdout and (tmp_path / "run" / "final.pt").is_file()


@pytest.mark.usefixtures("hydra_conf")
def test_st_pps_recipe_differs_from_gta_segs_where_its_released_one_does():
    """``dataset=pascal_voc method=st_pp``: three stages of 80 epochs, crop 321, whole-image evaluation, on the
    same labeled list; the method's settings are the schema's, and the command line still wins."""
    from hydra import compose
    from test_unimatch import differences

    gta_seg = compose("train", overrides=["dataset=pascal_voc"])
    st_pp = compose("train", overrides=["dataset=pascal_voc", "method=st_pp"])
    assert differences(gta_seg, st_pp) == {"dataset.crop_size": ("513", "321"), "trainer.epochs": ("80", "240"),
                                           "eval.mode": ("center_crop", "whole")}
    assert dict(st_pp.method) == {"_target_": "gta.methods.STPlusPlus", "ignore_index": 255, "select": 0.5,
                                  "cutout_prob": 0.5}
    assert st_pp.split == gta_seg.split
    assert compose("train", overrides=["dataset=pascal_voc", "method=st_pp", "trainer.epochs=30"]).trainer.epochs == 30
