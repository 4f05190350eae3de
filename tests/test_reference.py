"""The released code's behaviours (docs/algorithm.md §5): each switch alone, off by default, and the preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import IPE, configured_method, make_batch, sgd_update, snapshot, tiny_method
from hydra import compose
from hydra.utils import instantiate

from gta.contract import Progress
from gta.methods.gta import GTASeg
from gta.methods.pseudo_label import make_targets
from gta.methods.reference import GTASegReference, Reference
from gta.methods.reweight import Confidence

TOTAL = 4 * IPE  # warm-up epoch 0, first semi-supervised epoch 1, then epochs 2 and 3


def gta(**switches) -> GTASegReference:
    return tiny_method(GTASegReference, reference=Reference(**switches))


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def apart(a, b) -> bool:
    return not any(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def run(method, iterations, before=None):
    """``iterations`` of ``method`` with plain SGD, calling ``before(name)`` as each update begins."""
    check = before and (lambda name, loss: before(name))
    for it in iterations:
        method.training_step(make_batch(), Progress(it, IPE), sgd_update(method, check=check))


def test_shared_classifier_is_moved_by_both_optimisers():
    method = gta(shared_classifier=True)
    student_g = method.student.mask_predictor_parameters()
    assistant_g = method.assistant.mask_predictor_parameters()
    run(method, range(2 * IPE))  # warm-up and the first semi-supervised epoch: two classifiers
    assert apart(student_g, assistant_g)

    seen = {}

    def before(name):
        seen[name] = snapshot(student_g), snapshot(assistant_g)

    run(method, [2 * IPE], before=before)
    assert same(student_g, assistant_g)
    # the assistant's step (pseudo-labels) moves the student's g, and the student's step the assistant's
    assert apart(seen["assistant"][0], seen["student"][0])
    assert apart(seen["student"][1], assistant_g)
    # the feature extractors stay apart: only the EMA of Eq. 9 links them
    assert apart(method.student.feature_extractor_parameters(), method.assistant.feature_extractor_parameters())


def test_resync_makes_the_first_semi_supervised_epoch_self_training():
    method = gta(resync_first_epoch=True)
    student = list(method.student.parameters())
    seen = {}

    def before(name):
        seen[name] = snapshot(student)

    run(method, range(IPE))
    run(method, [IPE], before=before)
    for model in (method.teacher, method.assistant):
        assert same(model.parameters(), student)
    # the assistant's step on pseudo-labels trains the student itself, f and g alike
    assert apart(seen["assistant"], seen["student"])
    run(method, range(IPE + 1, 3 * IPE))
    for model in (method.teacher, method.assistant):  # the epoch is over: each model goes its own way
        assert not same(model.parameters(), student)


def test_resync_with_shared_classifier_keeps_only_the_classifier_shared():
    method = gta(resync_first_epoch=True, shared_classifier=True)
    run(method, range(3 * IPE))
    s, a = method.student, method.assistant
    assert same(s.mask_predictor_parameters(), a.mask_predictor_parameters())
    assert apart(s.feature_extractor_parameters(), a.feature_extractor_parameters())
    assert not same(s.parameters(), method.teacher.parameters())


class Aliased(GTASegReference):
    """The links as the released code makes them: one tensor (``.data`` assigned), at the start of an
    iteration, each model's own again (a clone) once the linked epoch is over."""

    def semi_supervised_step(self, batch, progress, update):
        ref, first = self.reference, self.since_hand_over(progress) < progress.iters_per_epoch
        with torch.no_grad():
            if ref.resync_first_epoch and first:
                for model in self.followers():
                    alias(model.parameters(), self.student.parameters())
            else:
                if ref.resync_first_epoch:
                    unalias(self.teacher.parameters(), self.student.parameters())
                    part = "feature_extractor_parameters" if ref.shared_classifier else "parameters"
                    unalias(getattr(self.assistant, part)(), getattr(self.student, part)())
                if ref.shared_classifier and not first:
                    alias(self.assistant.mask_predictor_parameters(), self.student.mask_predictor_parameters())
        return GTASeg.semi_supervised_step(self, batch, progress, update)


def alias(targets, sources):
    for t, s in zip(targets, sources, strict=True):
        t.data = s.data


def unalias(targets, sources):
    for t, s in zip(targets, sources, strict=True):
        if t.data_ptr() == s.data_ptr():
            t.data = s.data.clone()


@pytest.mark.parametrize("switches", [
    {"shared_classifier": True}, {"resync_first_epoch": True},
    {field.name: True for field in dataclasses.fields(Reference)},
], ids=["shared_classifier", "resync_first_epoch", "all"])
def test_tied_parameters_give_the_numbers_of_one_aliased_tensor(switches):
    trained = []
    for cls in (GTASegReference, Aliased):
        method = tiny_method(cls, reference=Reference(**switches))
        update = sgd_update(method, momentum=0.9)  # one optimiser per model all through: momentum carries over
        torch.manual_seed(1)  # the same batches and CutMix boxes for both
        for it in range(TOTAL):
            method.training_step(make_batch(), Progress(it, IPE), update)
        trained.append(method.state_dict())
    tied, aliased = trained
    assert tied.keys() == aliased.keys()
    assert [key for key in tied if not torch.equal(tied[key], aliased[key])] == []


def test_constant_assistant_lr():
    assert gta().scheduled("assistant")
    method = gta(constant_assistant_lr=True)
    assert not method.scheduled("assistant") and method.scheduled("student")


def test_mixed_confidence_comes_from_a_train_mode_forward():
    paper, method = gta(), gta(mixed_confidence=True)
    paper.teacher.train()(torch.rand(4, 3, 8, 8) * 5)  # running statistics unlike any batch: train != eval
    method.teacher.load_state_dict(paper.teacher.state_dict())
    paper.cutmix_prob = method.cutmix_prob = 0.0  # the train-mode forward sees the images the labels came from
    batch = make_batch()
    with torch.no_grad():
        eval_probs = paper.teacher.eval()(batch.unlabeled).softmax(1)
    ours, released = paper.pseudo_labels(batch), method.pseudo_labels(batch)
    with torch.no_grad():  # a train-mode forward normalises with the batch's statistics
        train_probs = paper.teacher.train()(batch.unlabeled).softmax(1)
    torch.testing.assert_close(ours.confidence, eval_probs.max(1).values)
    torch.testing.assert_close(released.confidence, train_probs.max(1).values, rtol=1e-4, atol=1e-5)
    kept = released.keep
    assert torch.equal(released.label[kept], eval_probs.argmax(1)[kept])  # labels: still the eval forward


class Fixed(torch.nn.Module):
    """A model whose logits are given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_dropped_pixels_in_the_normaliser():
    c = torch.tensor([[[0.9, 0.6, 0.3, 0.2, 0.8]]])
    valid = torch.tensor([[[True, True, True, True, False]]])  # the last pixel is crop padding
    t = make_targets(torch.zeros(1, 3, 1, 5), c, torch.zeros(1, 1, 5, dtype=torch.long), valid, 0.25,
                     Confidence(1.0), 255)
    assert t.keep.tolist() == [[[True, True, True, False, False]]]  # one of four valid pixels dropped
    logits = torch.randn(1, 2, 1, 5)
    ce = torch.nn.functional.cross_entropy(logits, torch.zeros(1, 1, 5, dtype=torch.long), reduction="none")
    raw = (c + 1) * t.keep
    expected = (raw * ce).sum() / (raw.sum() + 1)
    released = gta(dropped_in_normaliser=True).unlabeled_loss(Fixed(logits), t)
    assert released.item() == pytest.approx(expected.item(), rel=1e-6)
    assert gta().unlabeled_loss(Fixed(logits), t).item() != pytest.approx(expected.item(), rel=1e-3)


def test_bn_from_forwards():
    method = gta(bn_from_forwards=True)
    sizes = []
    method.student.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    bn_t, bn_s = method.teacher.features[1], method.student.features[1]
    run(method, range(IPE + 1))  # the warm-up and the hand-over, which copies the student's statistics
    sizes.clear()
    bn_s.running_mean.fill_(100.0)  # averaging the student's statistics would drag the teacher's up
    run(method, [IPE + 1])
    assert sizes == [4]  # the student's one forward: 2 labeled + 2 unlabeled images
    assert bn_t.running_mean.abs().max() < 10  # 0.1 * 100 if averaged: the teacher kept its own


def test_warmup_forwards_then_the_hand_over_copies_parameters_only():
    method = gta(warmup_forwards=True)
    teacher0, assistant0 = snapshot(method.teacher.parameters()), snapshot(method.assistant.parameters())
    stats0 = method.teacher.features[1].running_mean.clone()
    order = []
    run(method, range(IPE), before=order.append)
    assert order == ["student"] * IPE
    assert all(torch.equal(p, p0) for p, p0 in zip(method.teacher.parameters(), teacher0, strict=True))
    assert all(torch.equal(p, p0) for p, p0 in zip(method.assistant.parameters(), assistant0, strict=True))
    assert not torch.equal(method.teacher.features[1].running_mean, stats0)  # it ran forwards

    copied = []

    def before(name):
        if name == "assistant":  # the first semi-supervised step starts from copies of the student
            copied.append(all(torch.equal(a, s) for a, s in zip(
                method.assistant.parameters(), method.student.parameters(), strict=True)))

    teacher_stats = method.teacher.features[1].running_var.clone()
    run(method, [IPE], before=before)
    assert copied == [True]
    assert not same(method.assistant.parameters(), method.student.parameters())  # copies: apart after a step
    # the statistics stayed behind: the teacher's are its own warm-up's, averaged with the student's from
    # here on (0.9 * own + 0.1 * student's), not a copy of the student's
    bn_t, bn_s = method.teacher.features[1], method.student.features[1]
    assert not torch.equal(bn_t.running_var, bn_s.running_var)
    torch.testing.assert_close(bn_t.running_var, 0.9 * teacher_stats + 0.1 * bn_s.running_var)


def test_everything_on_trains_through_every_phase():
    method = gta(**{f.name: True for f in dataclasses.fields(Reference)})
    run(method, range(TOTAL))
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_preset_turns_every_switch_on(hydra_conf):
    cfg = compose("train", overrides=["method=gta_released"])
    method = configured_method(cfg)
    assert isinstance(method, GTASegReference) and all(dataclasses.asdict(method.reference).values())
    assert method.ema.alpha == 0.999 and method.ema.ramp  # §5.6
    assert cfg.dataset.pad_label == 0 and cfg.dataset.scale_pivot == 1.0  # §5.8, §5.10
    assert instantiate(cfg.eval).pad_label == 0  # §5.8 in validation too
    # the preset's values are defaults like any other: the command line still wins
    assert compose("train", overrides=["method=gta_released", "ema.alpha=0.99"]).method.ema.alpha == 0.99
    paper = compose("train")
    assert paper.dataset.pad_label is None and paper.dataset.scale_pivot is None and paper.method.ema.alpha == 0.99
    assert "reference" not in paper.method  # the paper's GTA-Seg has no switches to set
    one = compose("train", overrides=["method=gta_reference", "method.reference.mixed_confidence=true"])
    switches = configured_method(one).reference
    assert switches.mixed_confidence and not switches.shared_classifier
