"""Algorithm 1 at its phase boundaries (docs/algorithm.md §3), with the default ramped EMA: every model
starts as one network, the warm-up trains the student alone, and at the hand-over every follower is the
warmed-up student, so the first semi-supervised iteration changes little."""

from __future__ import annotations

import pytest
import torch
from helpers import sgd_update, tiny_method

from gta.contract import Batch, Progress
from gta.methods import GTASeg, MeanTeacher, UnbiasedST
from gta.methods.ema import EMA
from gta.methods.reference import GTASegReference

WARMUP = 30  # iterations of the one warm-up epoch: enough for the tiny network to learn the task below

METHODS = {
    "gta": GTASeg,
    "gta_reference": GTASegReference,  # every switch off
    "mean_teacher": MeanTeacher,
    "unbiased_st": UnbiasedST,
}


def build(name: str):
    return tiny_method(METHODS[name], ema=EMA(alpha=0.99, ramp=True))


def task(seed: int, size: int = 4) -> Batch:
    """A task the tiny network learns in a few dozen steps: each pixel's class is its brightest channel."""
    g = torch.Generator().manual_seed(seed)
    x_l, x_u = torch.rand(size, 3, 8, 8, generator=g), torch.rand(size, 3, 8, 8, generator=g)
    return Batch(x_l, x_l.argmax(1), x_u, torch.zeros(size, 8, 8, dtype=torch.long))


def sgd(method):
    return sgd_update(method, lr=0.2, momentum=0.9)


def warm_up(method, update):
    for it in range(WARMUP):
        method.training_step(task(it), Progress(it, WARMUP), update)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def followers(method) -> dict[str, torch.nn.Module]:
    return {name: model for name, model in method.evaluated_models().items() if name != "student"}


def network(model: torch.nn.Module) -> torch.nn.Module:
    """The part of a student its followers mirror (Unbiased ST's student also carries a pseudo head)."""
    return getattr(model, "network", model)


@pytest.mark.parametrize("name", METHODS)
def test_every_model_starts_as_one_network(name):
    method = build(name)
    student = network(method.student)
    assert all(states_equal(model, student) for model in followers(method).values())
    assert set(method.trained_models()) <= {"student", "assistant"}  # the teacher never has an optimiser
    assert not any(p.requires_grad for p in method.teacher.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_followers_are_the_warmed_up_student_when_the_first_pseudo_label_is_made(name):
    method = build(name)
    update = sgd(method)
    trained = []
    method.student.register_forward_pre_hook(lambda m, args: trained.append(m.training))
    warm_up(method, update)
    assert trained and all(trained)  # the student learned all through the warm-up
    student = network(method.student)
    initial = build(name)
    for model_name, model in followers(method).items():  # untrained copies of the initial network so far
        assert states_equal(model, network(initial.evaluated_models()[model_name]))
    assert not states_equal(student, network(initial.student))

    seen = {}

    def first_forward(model_name):
        def hook(module, args):
            # parameters and buffers (BatchNorm statistics) alike, before the model's first forward
            seen.setdefault(model_name, states_equal(module, student))
        return hook

    for model_name, model in followers(method).items():
        model.register_forward_pre_hook(first_forward(model_name))
    method.training_step(task(WARMUP), Progress(WARMUP, WARMUP), update)
    assert seen == {model_name: True for model_name in followers(method)}


def accuracy(model, batch: Batch) -> float:
    with torch.no_grad():
        return (model.eval()(batch.image).argmax(1) == batch.mask).float().mean().item()


@pytest.mark.parametrize("name", METHODS)
def test_the_student_barely_moves_over_the_first_semi_supervised_iteration(name):
    method = build(name)
    update = sgd(method)
    warm_up(method, update)
    held_out = task(1000, size=16)
    with torch.no_grad():
        before = method.student.eval()(held_out.image).argmax(1)
    assert accuracy(method.student, held_out) > 0.8  # it has learned something worth keeping

    method.training_step(task(WARMUP), Progress(WARMUP, WARMUP), update)
    with torch.no_grad():
        after = method.student.eval()(held_out.image).argmax(1)
    assert (after == before).float().mean() > 0.95
    for model in method.evaluated_models().values():  # and so does every model: none collapses
        assert accuracy(model, held_out) > 0.8


def test_mean_teachers_first_pseudo_labels_are_the_warmed_up_students_predictions():
    method = build("mean_teacher")
    update = sgd(method)
    warm_up(method, update)
    batch = task(WARMUP)
    with torch.no_grad():
        expected = method.student.eval()(batch.unlabeled).argmax(1)
    labels = []
    method.teacher.register_forward_hook(lambda m, args, out: labels.append(out.argmax(1)))
    method.training_step(batch, Progress(WARMUP, WARMUP), update)
    assert torch.equal(labels[0], expected)


def test_gta_reference_with_every_switch_off_trains_like_gta():
    paper, reference = build("gta"), build("gta_reference")
    update_paper, update_reference = sgd(paper), sgd(reference)
    for it in range(WARMUP + 4):
        progress = Progress(it, WARMUP)
        torch.manual_seed(it)
        paper.training_step(task(it), progress, update_paper)
        torch.manual_seed(it)
        reference.training_step(task(it), progress, update_reference)
    assert states_equal(paper, reference)


def test_val_miou_reports_the_student_until_the_hand_over(source, tmp_path):
    """Until the hand-over the teacher is a copy of the untrained network: ``val/miou`` is the student's (the
    model that learns), then the teacher's. Warm-up: 1 epoch of 2 iterations; the hand-over is iteration 3."""
    from helpers import Recorder, make_trainer

    logger = Recorder()
    trainer = make_trainer(source, tmp_path, logger, eval_every=1, iters=4)
    assert [trainer.method.reported_at(Progress(step, 2)) for step in range(5)] == [
        "student", "student", "student", "teacher", "teacher"]
    trainer.fit()
    evaluated = {step: m for step, m in logger.metrics.items() if "val/miou" in m}
    assert sorted(evaluated) == [1, 2, 3, 4]
    for step in (1, 2):
        assert evaluated[step]["val/miou"] == evaluated[step]["val/student/miou"]
        assert "val/teacher/miou" not in evaluated[step]  # eval.models=reported: the student alone
    for step in (3, 4):
        assert evaluated[step]["val/miou"] == evaluated[step]["val/teacher/miou"]
    assert trainer.reported == "teacher" and trainer.save_reported_model().name == "teacher.pt"
