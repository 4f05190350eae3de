"""The ablation variants of docs/algorithm.md §4 as config options: Unbiased ST, Table 7 data routing,
warm-up length, transmission scope and re-weighting, each composed from the config tree and checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import IPE, configured_method, make_batch, sgd_update, snapshot, tiny_method
from hydra import compose

from gta.config import CONF_DIR
from gta.contract import Progress
from gta.methods import GTASeg, MeanTeacher, UnbiasedST
from gta.models import Segmenter

AFTER_WARMUP = Progress(IPE, IPE)


def watch(batch):
    batch.unlabeled.requires_grad_(True)
    batch.image.requires_grad_(True)
    return batch


def reaches(loss, tensors):
    grads = torch.autograd.grad(loss, list(tensors), retain_graph=True, allow_unused=True)
    return [g is not None and bool(g.abs().sum() > 0) for g in grads]


# --- Unbiased ST ------------------------------------------------------------------------------------------


def test_unbiased_st_heads_learn_from_their_own_data_and_share_f():
    method = tiny_method(UnbiasedST)
    student = method.student
    main_head = list(student.network.head.parameters())
    pseudo_head = list(student.pseudo_head.parameters())
    f = student.network.feature_extractor_parameters()
    batch = watch(make_batch())
    seen = {}

    def check(name, loss):
        assert name == "student"
        stats_l = torch.nn.functional.cross_entropy(student(batch.image), batch.mask)
        seen["main head"] = reaches(loss, main_head)
        seen["pseudo head"] = reaches(loss, pseudo_head)
        seen["f"] = reaches(loss, f)
        # the labeled part alone never reaches the pseudo head
        seen["labels to pseudo head"] = reaches(stats_l, pseudo_head)

    teacher0 = snapshot(method.teacher.parameters())
    stats = method.training_step(batch, AFTER_WARMUP, sgd_update(method, check=check))
    assert set(stats) == {"student/loss_l", "student/loss_u", "kept"}
    assert all(seen["main head"]) and all(seen["pseudo head"]) and all(seen["f"])
    assert not any(seen["labels to pseudo head"])
    assert stats["student/loss_u"] > 0
    # the teacher is the EMA of the student's network (f and main head), never of the pseudo head
    for t, t0, s in zip(method.teacher.parameters(), teacher0, student.network.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_unbiased_st_pseudo_labels_never_reach_the_main_head():
    method = tiny_method(UnbiasedST)
    main_head = list(method.student.network.head.parameters())
    batch = watch(make_batch())
    loss_u = torch.nn.functional.cross_entropy(method.student.pseudo(batch.unlabeled), batch.mask)
    assert not any(reaches(loss_u, main_head))
    assert all(reaches(loss_u, method.student.pseudo_head.parameters()))


def test_unbiased_st_evaluates_and_reports_only_the_labeled_head():
    method = tiny_method(UnbiasedST)
    assert method.reported == "teacher" and set(method.evaluated_models()) == {"teacher", "student"}
    x = torch.rand(2, 3, 8, 8)
    method.eval()
    torch.testing.assert_close(method.student(x), method.student.network(x))
    assert not torch.allclose(method.student(x), method.student.pseudo(x))
    groups = method.student.param_groups(10.0)
    assert groups[-1]["name"] == "pseudo_head" and groups[-1]["lr_mult"] == 10.0
    assert sum(len(g["params"]) for g in groups) == len(list(method.student.parameters()))


def test_unbiased_st_warmup_trains_the_main_head_only():
    method = tiny_method(UnbiasedST)
    head0 = snapshot(method.student.pseudo_head.parameters())
    stats = method.training_step(make_batch(), Progress(0, IPE), sgd_update(method))
    assert set(stats) == {"student/loss_l"}
    head = method.student.pseudo_head.parameters()
    assert all(torch.equal(p, p0) for p, p0 in zip(head, head0, strict=True))


def test_segmenter_second_mask_predictor_shares_the_feature_extractor():
    torch.manual_seed(0)
    net = Segmenter(3, encoder_name="tu-resnet10t", decoder_channels=16).eval()
    x = torch.rand(1, 3, 40, 36)  # not a multiple of the stride: padded and cropped back
    with torch.no_grad():
        torch.testing.assert_close(net(x, mask_predictor=net.net.segmentation_head), net(x))
        head = net.new_mask_predictor()
        out = net(x, mask_predictor=head)
    assert out.shape == (1, 3, 40, 36)
    assert not any(p is q for p in head.parameters() for q in net.parameters())
    two_part = Segmenter(3, encoder_name="tu-resnet10t", decoder_channels=16,
                         mask_predictor=["segmentation_head", "decoder.block2"])
    with pytest.raises(ValueError, match="model.mask_predictor"):
        two_part.new_mask_predictor()


# --- Table 7: what the assistant and the student learn from -----------------------------------------------


def routed(method, progress=AFTER_WARMUP) -> tuple[dict, dict]:
    """One training step: which data (``labeled`` images, ``unlabeled`` ones) each model's loss reached, and
    the step's statistics."""
    batch = watch(make_batch())
    seen = {}

    opts = {n: torch.optim.SGD(m.parameters(), lr=0.1) for n, m in method.trained_models().items()}

    def update(name, loss):
        to_unlabeled, to_labeled = reaches(loss, [batch.unlabeled, batch.image])
        seen[name] = {"unlabeled": to_unlabeled, "labeled": to_labeled}
        opts[name].zero_grad()
        loss.backward(retain_graph=True)  # both models may share the graph of the watched, CutMixed x_u
        opts[name].step()

    return seen, method.training_step(batch, progress, update)


@pytest.mark.parametrize(("assistant_data", "student_data"), [
    ("pseudo", "labeled"), ("labeled", "pseudo"), ("labeled+pseudo", "labeled"), ("labeled+pseudo", "pseudo"),
])
def test_data_routing(assistant_data, student_data):
    seen, stats = routed(tiny_method(assistant_data=assistant_data, student_data=student_data))
    for name, data in (("assistant", assistant_data), ("student", student_data)):
        sources = data.split("+")
        assert seen[name] == {"unlabeled": "pseudo" in sources, "labeled": "labeled" in sources}, name
        expected = {f"{name}/loss_{'l' if s == 'labeled' else 'u'}" for s in sources}
        assert expected <= set(stats)


def test_data_routing_rejects_unknown_data():
    with pytest.raises(ValueError, match=r"method.student_data.*'unlabeled'"):
        tiny_method(student_data="unlabeled")


def test_warmup_length_trains_the_student_on_labels_for_that_many_epochs():
    method = tiny_method(warmup_epochs=2)
    order = []
    for it in range(3 * IPE):
        method.training_step(make_batch(), Progress(it, IPE), sgd_update(method, order))
    assert order == ["student"] * 2 * IPE + ["assistant", "student"] * IPE


# --- every variant is reachable from the config tree ------------------------------------------------------


def build(overrides):
    return configured_method(compose("train", overrides=overrides))


C, KEEP = torch.tensor([0.8, 0.4, 0.2]), torch.tensor([True, True, False])


def weighs(raw: list[float]):
    """The re-weighting gives the kept pixels weights proportional to ``raw``, summing to their number."""
    expected = torch.tensor(raw) * KEEP
    return lambda m: torch.allclose(m.reweight(C, KEEP), expected * KEEP.sum() / expected.sum())


@pytest.mark.parametrize(("overrides", "check"), [
    (["method=unbiased_st"], lambda m: isinstance(m, UnbiasedST)),
    (["reweight=none"], weighs([1.0, 1.0, 1.0])),
    (["reweight=confidence"], weighs([0.8, 0.4, 0.2])),  # w ∝ c
    (["reweight=laplace"], weighs([1.8, 1.4, 1.2])),  # Eq. 6: w ∝ c + 1
    # the baseline of Tables 1 and 4 (and make compare): Mean Teacher without re-weighting
    (["method=mean_teacher"], lambda m: isinstance(m, MeanTeacher) and weighs([1.0, 1.0, 1.0])(m)),
    (["method=mean_teacher", "reweight=laplace"], weighs([1.8, 1.4, 1.2])),  # the command line wins
    (["method=gta_no_reweight"], lambda m: type(m) is GTASeg and weighs([1.0, 1.0, 1.0])(m)),
    (["method=gta_ema_all"], lambda m: type(m) is GTASeg and m.transmit == "all" and weighs([1.8, 1.4, 1.2])(m)),
])
def test_variant_options_compose(hydra_conf, overrides, check):
    method = build(overrides)
    assert check(method), overrides


METHOD_OPTIONS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))


@pytest.mark.parametrize("name", METHOD_OPTIONS)
def test_every_method_option_builds_its_method(hydra_conf, name):
    """Options that set other groups too (``mean_teacher``: ``reweight=none``) live in the global package."""
    cfg = compose("train", overrides=[f"method={name}"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.method == name  # what a table's row key reads
    method = build([f"method={name}"])
    assert method.reported in method.evaluated_models()


def test_the_default_config_trains_as_the_paper_does(hydra_conf):
    """GTA-Seg from the default config: one warm-up epoch of the student alone; then the assistant learns from
    pseudo-labels only, the student from labels only, and the student takes the assistant's feature extractor
    and nothing else (Eq. 9)."""
    method = build([])
    assert isinstance(method, GTASeg)
    order = []
    for it in range(IPE):
        method.training_step(make_batch(), Progress(it, IPE), sgd_update(method, order))
    assert order == ["student"] * IPE
    seen, _ = routed(method, Progress(IPE, IPE))
    assert seen == {"assistant": {"unlabeled": True, "labeled": False},
                    "student": {"unlabeled": False, "labeled": True}}

    with torch.no_grad():  # an assistant unlike the student; no model steps itself below
        for p in method.assistant.parameters():
            p.add_(1.0)
    student = method.student
    f0, g0 = snapshot(student.feature_extractor_parameters()), snapshot(student.mask_predictor_parameters())
    method.training_step(make_batch(), Progress(IPE + 1, IPE), lambda name, loss: None)
    assert not any(torch.equal(p, p0) for p, p0 in zip(student.feature_extractor_parameters(), f0, strict=True))
    assert all(torch.equal(p, p0) for p, p0 in zip(student.mask_predictor_parameters(), g0, strict=True))
