"""CutMix-Seg is Mean Teacher with other options (conf/method/cutmix_seg.yaml): the config says exactly which,
a run of it equals Mean Teacher's with those options step for step, every unlabeled image is mixed, and the
teacher is the EMA of the student at a constant decay from the first iteration; exact resume."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import (
    SPLIT,
    assert_same_state,
    configured_method,
    contract_trainer,
    make_batch,
    sgd_update,
    snapshot,
    stopped_and_resumed,
)
from hydra import compose
from tiny import TinySegmenter

from gta.contract import Progress
from gta.data import build_loaders, select_split
from gta.methods import MeanTeacher
from gta.methods.ema import EMA
from gta.methods.reweight import Uniform
from gta.tracking import flatten_config

#: what method=cutmix_seg changes on method=mean_teacher, and nothing else
OPTIONS = ["method.cutmix_prob=1.0", "method.warmup_epochs=0", "ema.ramp=false"]


@pytest.mark.usefixtures("hydra_conf")
def test_cutmix_seg_is_mean_teacher_with_every_image_mixed_no_warm_up_and_a_constant_decay():
    cutmix_seg, mean_teacher = compose("train", overrides=["method=cutmix_seg"]), compose(
        "train", overrides=["method=mean_teacher"])
    flat = [flatten_config(c) for c in (cutmix_seg, mean_teacher)]
    changed = {k: (flat[0].get(k), flat[1].get(k)) for k in flat[0].keys() | flat[1].keys()
               if flat[0].get(k) != flat[1].get(k)}
    assert changed == {"method.cutmix_prob": ("1.0", "0.5"), "method.warmup_epochs": ("0", "1"),
                       "ema.ramp": ("False", "True"), "method.ema.ramp": ("False", "True")}  # method.ema is ${ema}
    assert compose("train", overrides=["method=mean_teacher", *OPTIONS]) == cutmix_seg


@pytest.mark.usefixtures("hydra_conf")
def test_a_run_of_cutmix_seg_equals_mean_teachers_with_its_options():
    """Four iterations from one seed: the same losses and the same models, bit for bit."""
    runs = []
    for overrides in (["method=cutmix_seg"], ["method=mean_teacher", *OPTIONS]):
        torch.manual_seed(0)
        method = configured_method(compose("train", overrides=overrides))
        assert type(method) is MeanTeacher
        update = sgd_update(method)
        torch.manual_seed(1)
        stats = [method.training_step(make_batch(), Progress(it, 2), update) for it in range(4)]
        runs.append((stats, method.state_dict()))
    (stats_a, state_a), (stats_b, state_b) = runs
    assert stats_a == stats_b
    assert_same_state(state_a, state_b)


def cutmix_seg(num_classes: int = 3, **options) -> MeanTeacher:
    """CutMix-Seg's options on the tiny network, every pixel kept unless ``drop``."""
    torch.manual_seed(0)
    settings = {"drop": 0.0, "cutmix_prob": 1.0, "warmup_epochs": 0, **options}
    return MeanTeacher(partial(TinySegmenter, num_classes), ema=EMA(0.99, ramp=False), reweight=Uniform(), **settings)


def test_every_unlabeled_image_is_mixed_and_its_pseudo_label_with_it():
    """With CutMix at probability 1, each student input has half its area from its partner, and there its
    pseudo-label is the partner's."""
    method = cutmix_seg()
    batch = make_batch()
    torch.manual_seed(2)
    targets = method.pseudo_labels(batch)
    partner = targets.image[:, 0] != batch.unlabeled[:, 0]
    assert [p.float().mean().item() for p in partner] == [36 / 64] * 2  # a box of round(8 sqrt(0.5)) = 6 a side
    with torch.no_grad():
        method.teacher.eval()
        own = method.teacher(batch.unlabeled).argmax(1)
    assert (own[0] != own[1]).any()  # so that a label taken from the wrong image shows
    assert torch.equal(targets.label, torch.where(partner, own.roll(-1, 0), own))


def test_the_teacher_averages_the_student_at_a_constant_decay_from_the_first_iteration():
    """No warm-up: the first iteration is semi-supervised, and after it teacher = 0.99 teacher_0 + 0.01 student."""
    method = cutmix_seg()
    teacher0 = snapshot(method.teacher.parameters())
    names = []
    stats = method.training_step(make_batch(), Progress(0, 2), sgd_update(method, log=names))
    assert names == ["student"] and "student/loss_u" in stats
    for t, t0, s in zip(method.teacher.parameters(), teacher0, method.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.99 * t0 + 0.01 * s)
    assert method.reported_at(Progress(1, 2)) == "teacher"


def trainer(source, run_dir, logger=None):
    loaders = build_loaders(source, select_split(source, SPLIT), 2, 0, seed=0, need_unlabeled=True)
    method = cutmix_seg(6, drop=0.2)
    return contract_trainer(source, loaders, method, run_dir, logger)


def test_a_stopped_run_resumes_exactly(source, tmp_path):
    stopped_and_resumed(partial(trainer, source), tmp_path, 3)
