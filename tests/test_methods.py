"""Algorithm 1 pinned down: who learns from what, transmission (Eq. 9), teacher EMA (Eq. 12), baselines."""

from functools import partial

import pytest
import torch
from helpers import IPE, make_batch, sgd_update, snapshot, tiny_method
from tiny import TinySegmenter

from gta.contract import Progress
from gta.methods import GTASeg, MeanTeacher, SupOnly
from gta.methods.cutmix import cutmix
from gta.methods.ema import EMA, ema_, ema_model_

#: the second semi-supervised iteration: past the hand-over, so the formulas of Eqs. 9 and 12 apply as written
AFTER_HAND_OVER = Progress(IPE + 1, IPE)


def handed_over(method):
    """``method`` as it stands after its hand-over (every follower a copy of the student)."""
    method.hand_over()
    return method


def test_gradient_routing_over_many_iterations():
    """After warm-up, the student's g only ever receives gradients from L_l and the assistant never
    sees labeled data."""
    method = tiny_method()
    seen_by_assistant = []
    method.assistant.register_forward_pre_hook(lambda m, args: seen_by_assistant.append(args[0].detach()))
    student_g = method.student.mask_predictor_parameters()
    order = []

    for it in range(4 * IPE):
        batch = make_batch()
        batch.unlabeled.requires_grad_(True)
        batch.image.requires_grad_(True)

        def check(name, loss, batch=batch, warmup=it < IPE):
            if warmup:  # the warm-up trains the student on labeled data
                return
            to_x_u, to_x_l = torch.autograd.grad(loss, [batch.unlabeled, batch.image], retain_graph=True,
                                                 allow_unused=True)
            to_student_g = torch.autograd.grad(loss, student_g, retain_graph=True, allow_unused=True)
            if name == "student":
                assert to_x_u is None, "unlabeled data reached the student's loss"
                assert to_x_l is not None
            if name == "assistant":
                assert to_x_l is None and to_x_u is not None
                assert all(g is None for g in to_student_g), "pseudo-labels reached the student's g"

        seen_by_assistant.clear()
        method.training_step(batch, Progress(it, IPE), sgd_update(method, order, check))
        if it >= IPE:  # after warm-up
            assert seen_by_assistant and all((x != 5.0).all() for x in seen_by_assistant)
    # the warm-up trains the student on labels, then the assistant steps before the student every iteration
    assert order == ["student"] * IPE + ["assistant", "student"] * 3 * IPE


def test_transmission_moves_only_the_feature_extractor():
    method = handed_over(tiny_method())
    alpha = 0.9
    student_f0 = snapshot(method.student.feature_extractor_parameters())
    student_g0 = snapshot(method.student.mask_predictor_parameters())
    teacher0 = snapshot(method.teacher.parameters())
    checked = []

    def check(name, loss):
        if name == "student":  # after transmission, before the student's own step
            for s, s0, a in zip(method.student.feature_extractor_parameters(), student_f0,
                                method.assistant.feature_extractor_parameters(), strict=True):
                torch.testing.assert_close(s, alpha * s0 + (1 - alpha) * a)
            for g, g0 in zip(method.student.mask_predictor_parameters(), student_g0, strict=True):
                assert torch.equal(g, g0)
            checked.append(name)

    method.training_step(make_batch(), AFTER_HAND_OVER, sgd_update(method, check=check))
    assert checked == ["student"]
    # Eq. 12: the teacher is the EMA of every student parameter (after the student's step).
    for t, t0, s in zip(method.teacher.parameters(), teacher0, method.student.parameters(), strict=True):
        torch.testing.assert_close(t, alpha * t0 + (1 - alpha) * s)


def test_transmit_all_moves_the_mask_predictor_too():
    method = handed_over(tiny_method(transmit="all"))
    g0 = snapshot(method.student.mask_predictor_parameters())
    checked = []

    def check(name, loss):
        if name == "student":
            for g, g_0, a in zip(method.student.mask_predictor_parameters(), g0,
                                 method.assistant.mask_predictor_parameters(), strict=True):
                torch.testing.assert_close(g, 0.9 * g_0 + 0.1 * a)
            checked.append(name)

    method.training_step(make_batch(), AFTER_HAND_OVER, sgd_update(method, check=check))
    assert checked == ["student"]
    with pytest.raises(ValueError, match="method.transmit"):
        tiny_method(transmit="encoder")


def test_mean_teacher_student_learns_from_both_losses():
    method = handed_over(tiny_method(MeanTeacher, unsup_weight=0.5))
    batch = make_batch()
    batch.unlabeled.requires_grad_(True)
    batch.image.requires_grad_(True)
    seen = {}

    def check(name, loss):
        seen["loss"] = loss.detach()
        seen["grads"] = torch.autograd.grad(loss, [batch.unlabeled, batch.image], retain_graph=True,
                                            allow_unused=True)

    teacher0 = snapshot(method.teacher.parameters())
    stats = method.training_step(batch, AFTER_HAND_OVER, sgd_update(method, check=check))
    assert seen["loss"].item() == pytest.approx((stats["student/loss_l"] + 0.5 * stats["student/loss_u"]).item(), rel=1e-6)
    assert all(g is not None for g in seen["grads"])  # both x_l and pseudo-labelled x_u reach the student
    for t, t0, s in zip(method.teacher.parameters(), teacher0, method.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_suponly_never_touches_unlabeled_data():
    method = SupOnly(partial(TinySegmenter, 3))
    assert not method.uses_unlabeled
    batch = make_batch()
    batch.unlabeled = batch.unlabeled_mask = None  # the engine does not even load them
    stats = method.training_step(batch, Progress(0, IPE), sgd_update(method))
    assert set(stats) == {"student/loss_l"} and list(method.trained_models()) == ["student"]


def test_ema_ramp_and_fused_update_match_the_formula():
    ema = EMA(alpha=0.99, ramp=True)
    assert [ema.decay(k) for k in (0, 1, 9)] == [0.0, 0.5, 0.9]
    assert ema.decay(10_000) == 0.99 and EMA(0.99, ramp=False).decay(0) == 0.99
    target, source = [torch.ones(3), torch.zeros(2)], [torch.full((3,), 3.0), torch.ones(2)]
    ema_(target, source, 0.75)
    assert target[0].tolist() == [1.5] * 3 and target[1].tolist() == [0.25] * 2


def test_model_ema_averages_bn_statistics_and_copies_counters():
    a, b = TinySegmenter(), TinySegmenter()
    b.train()(torch.randn(2, 3, 4, 4))  # move b's running statistics and counter
    bn_a, bn_b = a.features[1], b.features[1]
    mean0 = bn_a.running_mean.clone()
    ema_model_(a, b, 0.5)
    torch.testing.assert_close(bn_a.running_mean, 0.5 * mean0 + 0.5 * bn_b.running_mean)
    assert bn_a.num_batches_tracked == bn_b.num_batches_tracked == 1


def test_cutmix_keeps_image_label_and_confidence_aligned():
    torch.manual_seed(0)
    b, h, w = 4, 16, 16
    label = torch.arange(b).view(b, 1, 1).expand(b, h, w).clone()
    image = label.float().unsqueeze(1).expand(b, 3, h, w).clone()  # every channel encodes the label
    confidence = label.float() / 10
    mixed_image, mixed_label, mixed_conf = cutmix([image, label, confidence], prob=1.0)
    assert torch.equal(mixed_image[:, 0].long(), mixed_label)
    assert torch.equal(mixed_conf, mixed_label.float() / 10)
    for i in range(b):  # each image got exactly half its area from its partner
        assert (mixed_label[i] == (i + 1) % b).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert cutmix([image], prob=0.0)[0] is image


@pytest.mark.parametrize("cls", [GTASeg, MeanTeacher])
def test_inspect_shows_the_targets_and_changes_nothing(cls):
    method = tiny_method(cls)
    batch = make_batch()
    batch.unlabeled_mask[:, :, 6:] = 255  # two columns of crop padding
    before = snapshot(method.state_dict().values())
    rng = torch.get_rng_state()
    maps = method.inspect(batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(method.state_dict().values()), strict=True))
    assert list(maps) == ["pseudo-label", "confidence", "dropped", "weight"]
    assert all(m.shape == (2, 8, 8) for m in maps.values())
    label, confidence, dropped, weight = maps.values()
    assert label.dtype == torch.long and dropped.dtype == torch.bool and weight.is_floating_point()
    padding = batch.unlabeled_mask == 255
    assert (label[padding] == 255).all() and not dropped[padding].any()
    assert (label[dropped] == 255).all() and (weight[dropped] == 0).all()
    assert dropped.sum() == int(method.drop * (~padding).sum())  # distinct confidences: exactly the fraction
    assert ((confidence > 0) & (confidence <= 1)).all()
