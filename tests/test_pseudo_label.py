"""Eqs. 6-7 on hand-computed examples: threshold with ties, weights, weighted loss, edge cases."""

import math

import pytest
import torch
from syncs import HostSyncs

from gta.methods.pseudo_label import keep_confident, make_targets, weighted_cross_entropy
from gta.methods.reweight import Confidence, Uniform

IGNORE = 255


def two_class_logits(margins: list[float]) -> torch.Tensor:
    """Logits (1, 2, 1, N) whose CE against class 0 at pixel i is log(1 + exp(-margin_i))."""
    m = torch.tensor(margins)
    return torch.stack([m, torch.zeros_like(m)]).view(1, 2, 1, -1)


def test_threshold_drops_ties_at_the_percentile():
    c = torch.tensor([[[0.9, 0.5, 0.3, 0.3, 0.7, 0.3]]])
    valid = torch.ones_like(c, dtype=torch.bool)
    # drop 20% of 6 pixels: k = 1, gamma = 0.3, and all three pixels at 0.3 go.
    keep = keep_confident(c, valid, drop=0.2)
    assert keep.tolist() == [[[True, True, False, False, True, False]]]


def test_threshold_ignores_invalid_pixels_and_drop_zero_keeps_all():
    c = torch.tensor([[[0.1, 0.2, 0.8, 0.9]]])
    valid = torch.tensor([[[False, True, True, True]]])
    assert keep_confident(c, valid, drop=0.0).equal(valid)
    # 3 valid pixels, k = floor(0.4 * 3) = 1: gamma is 0.2 (the padding pixel 0.1 is not counted).
    assert keep_confident(c, valid, drop=0.4).tolist() == [[[False, False, True, True]]]
    with pytest.raises(ValueError, match="method.drop"):
        keep_confident(c, valid, drop=1.0)


def kth_of_valid(confidence: torch.Tensor, valid: torch.Tensor, drop: float) -> torch.Tensor:
    """The threshold by its definition: the k-th smallest confidence of the valid pixels, k = floor(drop n)."""
    values = confidence[valid]
    k = int(drop * values.numel())
    return valid.clone() if k == 0 else valid & (confidence > values.kthvalue(k).values)


def test_threshold_equals_its_definition_on_random_batches():
    generator = torch.Generator().manual_seed(0)
    for case in range(300):
        shape = (int(torch.randint(1, 4, (), generator=generator)), 1 + case % 7, 1 + case % 5)
        levels = 2 + case % 9  # few distinct values: many ties at the threshold
        confidence = torch.randint(0, levels, shape, generator=generator) / levels
        valid = torch.rand(shape, generator=generator) < [1.0, 0.7, 0.2, 0.0][case % 4]
        drop = [0.0, 0.05, 0.2, 0.5, 0.9][case % 5]
        expected = kth_of_valid(confidence, valid, drop)
        assert keep_confident(confidence, valid, drop).equal(expected), (case, confidence, valid, drop)


def test_threshold_never_waits_for_the_device():
    c = torch.rand(2, 9, 9)
    valid = torch.rand(2, 9, 9) > 0.3
    with HostSyncs() as syncs:
        keep_confident(c, valid, drop=0.2)
    assert syncs.ops == []
    with HostSyncs() as syncs:  # the check sees the definition's sync: indexing by a mask
        kth_of_valid(c, valid, drop=0.2)
    assert syncs.ops == ["aten.index.Tensor"]
    with HostSyncs() as syncs:
        float(c.sum())
    assert syncs.ops == ["aten._local_scalar_dense.default"]


def test_laplace_weights_and_loss_by_hand():
    c = torch.tensor([[[0.9, 0.5, 0.3, 0.3, 0.7, 0.3]]])
    label = torch.zeros(1, 1, 6, dtype=torch.long)
    valid = torch.ones_like(c, dtype=torch.bool)
    t = make_targets(torch.zeros(1, 3, 1, 6), c, label, valid, 0.2, Confidence(tau=1.0), IGNORE)
    # kept: 0.9, 0.5, 0.7 -> raw weights 1.9, 1.5, 1.7 (sum 5.1), rescaled to sum to 3.
    expected_w = [1.9 * 3 / 5.1, 1.5 * 3 / 5.1, 0.0, 0.0, 1.7 * 3 / 5.1, 0.0]
    assert t.weight.flatten().tolist() == pytest.approx(expected_w, rel=1e-6)
    assert t.label.flatten().tolist() == [0, 0, IGNORE, IGNORE, 0, IGNORE]

    margins = [2.0, 1.0, -1.0, 0.5, 0.0, 3.0]
    ce = [math.log1p(math.exp(-m)) for m in margins]
    loss = weighted_cross_entropy(two_class_logits(margins), t, IGNORE)
    expected = sum(w * e for w, e in zip(expected_w, ce, strict=True)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_confidence_only_and_uniform_weights():
    c = torch.tensor([0.8, 0.4, 0.2])
    keep = torch.tensor([True, True, False])
    assert Confidence(tau=0.0)(c, keep).tolist() == pytest.approx([0.8 * 2 / 1.2, 0.4 * 2 / 1.2, 0.0])
    assert Uniform()(c, keep).tolist() == [1.0, 1.0, 0.0]


def test_all_pixels_dropped_gives_zero_loss_and_zero_gradient():
    c = torch.full((1, 1, 5), 0.6)  # k = 1 and every pixel ties with the threshold
    valid = torch.ones_like(c, dtype=torch.bool)
    t = make_targets(torch.zeros(1, 3, 1, 5), c, torch.zeros(1, 1, 5, dtype=torch.long), valid, 0.2,
                     Confidence(1.0), IGNORE)
    assert not t.keep.any() and t.weight.sum() == 0
    logits = two_class_logits([1.0, 2.0, 3.0, 4.0, 5.0]).requires_grad_()
    loss = weighted_cross_entropy(logits, t, IGNORE)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
