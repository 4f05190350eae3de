"""UniMatch pinned down equation by equation: the unlabeled loss (threshold, padding, the division), the
weights of L, which view feeds which term, no gradient through the pseudo-label, CutMix boxes shared by the
image and its targets, the perturbed decoding, OHEM, and the views and second batch the data brings.

Most tests run the method on ``Linear``: a network whose logits are its input times one weight, so every
term's value can be written down by hand from the pixels a test puts into each view."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import ITERS, SPLIT, contract_trainer, shapes, stopped_and_resumed, tiny
from tiny import TinySegmenter
from torch import nn

import gta.methods.unimatch as unimatch
from gta.contract import Batch, Progress, Unlabeled
from gta.data import build_loaders, select_split
from gta.data.config import ViewConfig
from gta.data.transforms import photometric_view
from gta.errors import ConfigError, ContractError
from gta.methods import UniMatch
from gta.methods.ohem import ohem_cross_entropy
from gta.methods.unimatch import Targets, cutmix_boxes, unlabeled_loss

LN = math.log


class Linear(nn.Module):
    """Logits = w * x (the image's channels are the classes), w = 1 to start."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.w * x

    def perturbed_forward(self, x, perturb):
        return self.w * x, self.w * perturb(x)


def pixels(*logits: tuple[float, float]) -> torch.Tensor:
    """A 1 x 2 x 1 x N image of two-class logits, one pair per pixel."""
    return torch.tensor(logits, dtype=torch.float32).T.reshape(1, 2, 1, len(logits))


def method(**options) -> UniMatch:
    settings = {"ignore_index": 255, "conf_thresh": 0.7, "cutmix_prob": 0.0, "fp_dropout": 0.0,
                "ohem_thresh": None, "ohem_min_kept": 0, **options}
    return UniMatch(Linear, **settings)


def batch(x_l, y_l, x_w, s1, s2, mix_w=None, mix_s1=None, mix_s2=None, padding=None, mix_padding=None) -> Batch:
    """One labeled and one unlabeled image (the second batch: the first's unless given)."""
    size = x_w.shape[-2:]
    zero = torch.zeros(1, *size, dtype=torch.long)
    mix = Unlabeled(x_w if mix_w is None else mix_w, zero if mix_padding is None else mix_padding,
                    {"strong1": s1 if mix_s1 is None else mix_s1, "strong2": s2 if mix_s2 is None else mix_s2})
    return Batch(x_l, torch.tensor(y_l).view(1, 1, -1), x_w, zero if padding is None else padding,
                 {"strong1": s1, "strong2": s2}, mix)


def step(m: UniMatch, b: Batch) -> tuple[torch.Tensor, dict]:
    seen = []
    stats = m.training_step(b, Progress(0, 1), lambda name, loss: seen.append((name, loss)))
    assert [name for name, _ in seen] == ["student"]
    return seen[0][1], stats


# the hand-computed example: x_w's one pixel is class 1 with confidence 3/4 (logits 0, ln 3); each other input
# has its own cross-entropy against class 1, so a view feeding the wrong term changes that term's value
X_W = pixels((0.0, LN(3)))  # CE against class 1: ln(4/3)
S1 = pixels((LN(3), 0.0))  # p(class 1) = 1/4: ln 4
S2 = pixels((LN(7), 0.0))  # p(class 1) = 1/8: ln 8
X_L, Y_L = pixels((0.0, 0.0)), [0]  # ln 2


def test_the_loss_of_a_hand_computed_iteration():
    """L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, each term from its own view."""
    loss, stats = step(method(), batch(X_L, Y_L, X_W, S1, S2))
    expected = {"student/loss_l": LN(2), "student/loss_s1": LN(4), "student/loss_s2": LN(8),
                "student/loss_fp": LN(4 / 3)}  # without dropout, the perturbed features are x_w's own
    assert {k: stats[k].item() for k in expected} == pytest.approx(expected)
    total = (LN(2) + 0.25 * LN(4) + 0.25 * LN(8) + 0.5 * LN(4 / 3)) / 2
    assert loss.item() == pytest.approx(total)
    assert stats["kept"].item() == 1.0


def test_the_feature_perturbation_feeds_l_fp():
    """With every channel dropped, x_w's perturbed logits are 0: L_fp = ln 2 (not x_w's clean ln 4/3)."""
    _, stats = step(method(fp_dropout=1.0), batch(X_L, Y_L, X_W, S1, S2))
    assert stats["student/loss_fp"].item() == pytest.approx(LN(2))
    assert stats["student/loss_s1"].item() == pytest.approx(LN(4))  # the strong views are not perturbed


def test_a_pixel_below_the_threshold_counts_in_the_divisor_only():
    """Confidence 3/4 against thresholds 0.75 (kept: >=) and 0.76 (dropped, the term 0)."""
    _, at = step(method(conf_thresh=0.75), batch(X_L, Y_L, X_W, S1, S2))
    _, above = step(method(conf_thresh=0.76), batch(X_L, Y_L, X_W, S1, S2))
    assert at["student/loss_s1"].item() == pytest.approx(LN(4))
    assert above["student/loss_s1"].item() == above["student/loss_fp"].item() == above["kept"].item() == 0.0


def test_unlabeled_loss_sums_the_kept_pixels_and_divides_by_the_real_ones():
    """Four pixels: kept (ln 4), at the threshold (kept, ln 4/3), below it (dropped), padding (neither)."""
    logits = pixels((LN(3), 0.0), (0.0, LN(3)), (0.0, 0.0), (5.0, 0.0))
    targets = Targets(label=torch.tensor([[[1, 1, 0, 1]]]), confidence=torch.tensor([[[0.9, 0.5, 0.25, 0.9]]]),
                      valid=torch.tensor([[[True, True, True, False]]]))
    assert unlabeled_loss(logits, targets, conf_thresh=0.5).item() == pytest.approx((LN(4) + LN(4 / 3)) / 3)


def test_no_gradient_reaches_the_weak_view_through_its_pseudo_label():
    """With the perturbed branch dropped entirely, x_w feeds only the targets: its gradient is zero, while
    the strong views receive theirs."""
    b = batch(X_L, Y_L, X_W.clone().requires_grad_(True), S1.clone().requires_grad_(True), S2)
    loss, _ = step(method(fp_dropout=1.0), b)
    to_weak, to_strong = torch.autograd.grad(loss, [b.unlabeled, b.views["strong1"]])
    assert torch.count_nonzero(to_weak) == 0 and torch.count_nonzero(to_strong) > 0


@pytest.mark.parametrize(("conf_thresh", "first_pixel"), [
    (0.0, LN(8)),  # the pasted box: the second batch's strong view against its own label, class 0
    (0.8, 0.0),  # its confidence (3/4) is pasted too: below 0.8, the box does not count
])  # fmt: skip
def test_cutmix_pastes_the_same_box_into_the_image_and_its_targets(monkeypatch, conf_thresh, first_pixel):
    """A box over the first of two pixels: image, pseudo-label, confidence and padding come from the second
    batch there, from the first batch elsewhere."""
    monkeypatch.setattr(unimatch, "cutmix_boxes", lambda b, h, w, p, device: torch.tensor([[[True, False]]]))
    first_w = pixels((0.0, LN(7)), (0.0, LN(7)))  # class 1, confidence 7/8
    mix_w = pixels((LN(3), 0.0), (LN(3), 0.0))  # class 0, confidence 3/4
    first_s = pixels((LN(3), 0.0), (LN(3), 0.0))
    mix_s = pixels((0.0, LN(7)), (0.0, LN(7)))
    # if only the image were pasted: CE([0, ln 7], class 1) = ln 8/7; only the label: CE([ln 3, 0], 0) = ln 4/3
    _, stats = step(method(conf_thresh=conf_thresh), batch(
        pixels((0.0, 0.0), (0.0, 0.0)), [0, 0], first_w, first_s, first_s, mix_w, mix_s, mix_s))
    expected = (first_pixel + LN(4)) / 2  # the second pixel: CE([ln 3, 0], class 1) = ln 4
    assert stats["student/loss_s1"].item() == pytest.approx(expected)
    assert stats["student/loss_s2"].item() == pytest.approx(expected)
    # where the second batch's crop is padding, the pixel leaves the divisor as well
    padded = torch.tensor([[255, 0]])
    _, stats = step(method(conf_thresh=conf_thresh), batch(
        pixels((0.0, 0.0), (0.0, 0.0)), [0, 0], first_w, first_s, first_s, mix_w, mix_s, mix_s, mix_padding=padded))
    assert stats["student/loss_s1"].item() == pytest.approx(LN(4))


def test_cutmix_boxes_cover_2_to_40_percent_at_aspect_03_to_1_over_03():
    torch.manual_seed(0)
    boxes = cutmix_boxes(4000, 100, 100, prob=0.5, device=torch.device("cpu"))
    drawn = boxes.flatten(1).any(1)
    assert 0.45 < drawn.float().mean() < 0.55
    area = boxes[drawn].flatten(1).float().mean(1)
    assert area.min() >= 0.0175 and area.max() <= 0.4  # floor() takes off at most a row and a column
    assert 0.18 < area.mean() < 0.23  # uniform over [0.02, 0.4]: mean 0.21 (GTA-Seg's boxes: 0.5 each)
    rows, cols = boxes[drawn].any(2).sum(1).float(), boxes[drawn].any(1).sum(1).float()
    aspect = rows / cols
    assert aspect.min() >= 0.3 * 0.8 and aspect.max() <= 1 / 0.3 * 1.2  # up to a pixel off by floor()
    assert (rows * cols == boxes[drawn].flatten(1).sum(1)).all()  # rectangles
    assert not cutmix_boxes(50, 8, 8, prob=0.0, device=torch.device("cpu")).any()


def test_the_perturbed_decoding_leaves_the_clean_one_unchanged():
    """On the Segmenter: the clean half is the plain forward's output, the perturbed one differs, and
    an identity perturbation gives the clean output twice."""
    from hydra import compose
    from hydra.utils import instantiate

    from gta.contract import PerturbedDecoding

    torch.manual_seed(0)
    network = instantiate(compose("train").model).eval()
    assert isinstance(network, PerturbedDecoding)
    x = torch.randn(2, 3, 40, 56)  # not a multiple of the stride: padded, then cropped back
    with torch.no_grad():
        plain = network(x)
        clean, perturbed = network.perturbed_forward(x, lambda f: F.dropout2d(f, 0.5, training=True))
        same = network.perturbed_forward(x, lambda f: f)
    torch.testing.assert_close(clean, plain)
    assert perturbed.shape == plain.shape and not torch.allclose(perturbed, plain)
    torch.testing.assert_close(same[0], plain) and torch.testing.assert_close(same[1], plain)


test_the_perturbed_decoding_leaves_the_clean_one_unchanged = pytest.mark.usefixtures("hydra_conf")(
    test_the_perturbed_decoding_leaves_the_clean_one_unchanged)


def test_a_network_without_perturbed_decoding_is_refused_naming_what_it_lacks():
    class Plain(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ContractError, match="PerturbedDecoding.*Plain lacks perturbed_forward"):
        UniMatch(Plain, 255, 0.95, 0.5, 0.5, None, 0)


def ohem_logits(p_true: list[float]) -> torch.Tensor:
    """Two-class logits whose probability of class 0 is each of ``p_true``, one pixel each."""
    p = torch.tensor(p_true)
    return torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, -1)


@pytest.mark.parametrize(("min_kept", "kept"), [
    (1, [0.6, 0.3]),  # at most 0.7
    (3, [0.6, 0.3, 0.8]),  # the 3 least probable: the threshold rises to the 3rd smallest, 0.8
    (5, [0.9, 0.6, 0.3, 0.8]),  # fewer labeled pixels than min_kept: all of them
])  # fmt: skip
def test_ohem_keeps_the_hard_pixels(min_kept, kept):
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    logits = torch.cat([ohem_logits([0.9, 0.6, 0.3, 0.8]), ohem_logits([0.01])], dim=3)
    loss = ohem_cross_entropy(logits, target, 255, thresh=0.7, min_kept=min_kept)
    assert loss.item() == pytest.approx(sum(-LN(p) for p in kept) / len(kept), rel=1e-5)


# --- the views and the second batch, from the data up ---------------------------------------------------


def test_views_share_the_weak_views_crop_and_leave_its_random_numbers_as_they_were(tmp_path):
    """An unlabeled item is (weak, padding, *views): each view is the weak view's crop through its own
    pipeline, and the weak view is drawn exactly as without views."""
    source = shapes(tmp_path, unlabeled=4)
    split = select_split(source, 4)
    plain = build_loaders(source, split, 2, 0, seed=0, need_unlabeled=True)
    same = {"identity": lambda image: image, "dark": lambda image: image // 2}
    viewed = build_loaders(source, split, 2, 0, seed=0, need_unlabeled=True, views=same, second_unlabeled=True)
    assert viewed.views == ("identity", "dark") and plain.second_unlabeled is None
    for (u, m), (weak, mask, identity, dark) in zip(plain.unlabeled, viewed.unlabeled, strict=True):
        assert torch.equal(u, weak) and torch.equal(m, mask) and torch.equal(identity, weak)
        assert not torch.equal(dark, weak)
    # the second stream: the same images in another order
    first = [w for w, *_ in viewed.unlabeled]
    second = [w for w, *_ in viewed.second_unlabeled]
    assert len(first) == len(second) and not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.usefixtures("hydra_conf")
def test_a_method_reading_a_view_data_views_lacks_fails_naming_it():
    from hydra import compose

    from gta.train import view_pipelines

    cfg = compose("train", overrides=["method=unimatch", "~data.views.strong2"])
    with pytest.raises(ConfigError, match="data.views has no strong2"):
        view_pipelines(cfg, UniMatch(partial(TinySegmenter, 6), 255, 0.95, 0.5, 0.5, None, 0))
    strong = compose("train", overrides=["method=unimatch", "data.views.strong1.blur_prob=1.0"])
    assert set(view_pipelines(strong, UniMatch(partial(TinySegmenter, 6), 255, 0.95, 0.5, 0.5, None, 0))) == {
        "strong1", "strong2"}


@pytest.mark.slow
def test_python_m_gta_train_method_unimatch(tmp_path):
    from helpers import gta

    result = gta("train", "method=unimatch", *tiny(tmp_path / "data", iters=3), f"hydra.run.dir={tmp_path / 'run'}")
    assert "UniMatch on SyntheticShapes" in result.stdout and "val mIoU student" in result.stdout
    assert (tmp_path / "run" / "student.pt").is_file()


# --- recipes --------------------------------------------------------------------------------------------


def differences(a, b) -> dict:
    """The values that differ between two composed configs, the method node aside: {key: (a's, b's)}."""
    from gta.tracking import flatten_config

    flat_a, flat_b = (flatten_config({k: v for k, v in c.items() if k != "method"}) for c in (a, b))
    return {k: (flat_a.get(k), flat_b.get(k)) for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k)}


@pytest.mark.usefixtures("hydra_conf")
@pytest.mark.parametrize(("dataset", "expected", "method"), [
    ("pascal_voc", {"model.output_stride": ("8", "16"), "dataset.crop_size": ("513", "321"),
                    "data.batch_size": ("3", "2"), "eval.mode": ("center_crop", "whole")},
     {"conf_thresh": 0.95, "ohem_thresh": None}),
    ("pascal_voc_aug", {"model.output_stride": ("8", "16"), "data.batch_size": ("3", "2"),
                        "eval.mode": ("center_crop", "whole")},
     {"conf_thresh": 0.95, "ohem_thresh": None}),
    ("cityscapes", {"model.output_stride": ("8", "16"), "dataset.crop_size": ("769", "801"),
                    "optimizer.lr": ("0.01", "0.005"), "optimizer.weight_decay": ("0.0005", "0.0001"),
                    "trainer.epochs": ("200", "240"), "trainer.decoder_lr_mult": ("10.0", "1.0"),
                    "eval.crop_size": ("769", "801"), "eval.stride": ("513", "534")},
     {"conf_thresh": 0.0, "ohem_thresh": 0.7, "ohem_min_kept": 200000}),
])  # fmt: skip
def test_unimatchs_recipe_differs_from_gta_segs_where_its_released_one_does(dataset, expected, method):
    """``dataset=D method=unimatch``: UniMatch's recipe on the same dataset and labeled list; the command line
    still wins, and GTA-Seg keeps its own."""
    from hydra import compose

    gta_seg = compose("train", overrides=[f"dataset={dataset}"])
    uni = compose("train", overrides=[f"dataset={dataset}", "method=unimatch"])
    assert differences(gta_seg, uni) == expected
    assert {k: uni.method[k] for k in method} == method and uni.split == gta_seg.split
    given = compose("train", overrides=[f"dataset={dataset}", "method=unimatch", "model.output_stride=8"])
    assert given.model.output_stride == 8


# --- exact resume ---------------------------------------------------------------------------------------


def trainer(source, run_dir, logger=None):
    """UniMatch on the tiny network for ITERS iterations of 2 + 2 (+ 2) images, both strong views made."""
    view = ViewConfig()
    strong = partial(photometric_view, view.jitter, view.jitter_prob, view.grayscale_prob, view.blur_prob,
                     view.blur_sigma)
    loaders = build_loaders(source, select_split(source, SPLIT), 2, 0, seed=0, need_unlabeled=True,
                            views={name: strong() for name in UniMatch.views}, second_unlabeled=True)
    torch.manual_seed(0)
    method = UniMatch(partial(TinySegmenter, 6), 255, conf_thresh=0.0, cutmix_prob=0.5, fp_dropout=0.5,
                      ohem_thresh=None, ohem_min_kept=0)
    return contract_trainer(source, loaders, method, run_dir, logger)


def test_a_stopped_run_resumes_exactly_with_views_and_the_second_batch(source, tmp_path):
    """Views, the second stream, CutMix boxes and dropout masks are all drawn again exactly after a resume."""
    _, resumed = stopped_and_resumed(partial(trainer, source), tmp_path, 3)
    assert "train/student/loss_s1" in resumed.logger.metrics[ITERS]
