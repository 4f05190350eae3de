"""CPS pinned down equation by equation: each network learns from the labels and from the *other's*
pseudo-labels of the mixed image, weighted by λ; the pseudo-label is mixed with the image's boxes; crop
padding carries no label; no gradient crosses from one network to the other; the boxes' distribution; two
networks that start apart; exact resume; the command and the recipes.

Most tests run the method on two ``Linear`` networks whose logits are their input times a weight, +1 for
``net1`` and -1 for ``net2``: with two classes, ``net2``'s argmax is the other class than ``net1``'s, so a
pseudo-label that supervises its own network, or comes from the wrong image, changes a number."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from helpers import (
    ITERS,
    SPLIT,
    contract_trainer,
    make_batch,
    snapshot,
    stopped_and_resumed,
    tiny,
)
from tiny import TinySegmenter
from torch import nn

import gta.methods.cps as cps
from gta.contract import Batch, Progress, Unlabeled
from gta.data import build_loaders, select_split
from gta.methods import CPS
from gta.methods.cps import box_masks

LN = math.log


class Linear(nn.Module):
    """Logits = w * x (the image's channels are the classes)."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return self.w * x


def pixels(*logits: tuple[float, float]) -> torch.Tensor:
    """A 1 x 2 x 1 x N image of two-class logits, one pair per pixel."""
    return torch.tensor(logits, dtype=torch.float32).T.reshape(1, 2, 1, len(logits))


def method(**options) -> CPS:
    """net1 = Linear(+1), net2 = Linear(-1): the factory is called once per network, in that order."""
    weights = iter([1.0, -1.0])
    settings = {"ignore_index": 255, "cps_weight": 2.0, "boxes": 1, "box_area": (0.25, 0.5), "ohem_thresh": None,
                "ohem_min_kept": 0, **options}
    return CPS(lambda: Linear(next(weights)), **settings)


def batch(x_l, y_l, x_u, x_second, padding=None, second_padding=None) -> Batch:
    zero = torch.zeros(1, *x_u.shape[-2:], dtype=torch.long)
    second = Unlabeled(x_second, zero if second_padding is None else second_padding)
    return Batch(x_l, torch.tensor(y_l).view(1, 1, -1), x_u, zero if padding is None else padding, {}, second)


def step(m: CPS, b: Batch) -> tuple[dict, dict]:
    seen = {}
    stats = m.training_step(b, Progress(0, 1), lambda name, loss: seen.setdefault(name, loss))
    assert list(seen) == ["net1", "net2"]
    return seen, stats


@pytest.fixture
def first_pixel_boxed(monkeypatch):
    """The boxes cover the first of two pixels: there the mixed image is the second batch's."""
    monkeypatch.setattr(cps, "box_masks", lambda b, h, w, n, area, device: torch.tensor([[[True, False]]]))


# the hand-computed example. net1's argmax of each source pixel: x_u (1, 0), x'_u (0, 1); the mixed image takes
# x'_u's first pixel and x_u's second: logits (ln 7, 0), (ln 3, 0), so ŷ_1 = (0, 0) and ŷ_2 = (1, 1); had the
# pseudo-label been made on the un-mixed x_u, ŷ_1 would be (1, 0)
X_U = pixels((0.0, LN(3)), (LN(3), 0.0))
X_SECOND = pixels((LN(7), 0.0), (0.0, LN(7)))
X_L, Y_L = pixels((LN(3), 0.0)), [0]  # net1: p(0) = 3/4, CE ln 4/3; net2: p(0) = 1/4, CE ln 4


@pytest.mark.usefixtures("first_pixel_boxed")
def test_the_loss_of_a_hand_computed_iteration():
    """L_k = L_sup(k) + λ CE(p_k(x_m), ŷ_other), λ = 2; each CE the mean over the two pixels."""
    losses, stats = step(method(), batch(X_L, Y_L, X_U, X_SECOND))
    # net1 on x_m, logits (ln 7, 0), (ln 3, 0), against ŷ_2 = (1, 1): ln 8, ln 4 (against its own ŷ_1: ln 8/7, ln 4/3)
    # net2 on x_m, logits (-ln 7, 0), (-ln 3, 0), against ŷ_1 = (0, 0): ln 8, ln 4
    expected = {"net1/loss_l": LN(4 / 3), "net1/loss_cps": (LN(8) + LN(4)) / 2,
                "net2/loss_l": LN(4), "net2/loss_cps": (LN(8) + LN(4)) / 2}
    assert {k: stats[k].item() for k in expected} == pytest.approx(expected)
    assert losses["net1"].item() == pytest.approx(LN(4 / 3) + 2 * (LN(8) + LN(4)) / 2)
    assert losses["net2"].item() == pytest.approx(LN(4) + 2 * (LN(8) + LN(4)) / 2)
    assert stats["agree"].item() == 0.0  # ŷ_1 and ŷ_2 differ at both pixels


def test_without_boxes_the_mixed_image_and_its_pseudo_labels_are_x_us():
    """No box (``boxes=0``): x_m = x_u, ŷ_1 = (1, 0), ŷ_2 = (0, 1); each network's CE against the other's is ln 4
    at both pixels (against the second batch's labels it would not be)."""
    _, stats = step(method(boxes=0), batch(X_L, Y_L, X_U, X_SECOND))
    assert stats["net1/loss_cps"].item() == pytest.approx(LN(4))
    assert stats["net2/loss_cps"].item() == pytest.approx(LN(4))


@pytest.mark.usefixtures("first_pixel_boxed")
def test_the_second_batchs_padding_inside_the_box_carries_no_label():
    """Where the pasted pixel is crop padding, it leaves both CPS terms: each is its second pixel's alone."""
    _, stats = step(method(), batch(X_L, Y_L, X_U, X_SECOND, second_padding=torch.tensor([[255, 0]])))
    assert stats["net1/loss_cps"].item() == pytest.approx(LN(4))
    assert stats["net2/loss_cps"].item() == pytest.approx(LN(4))
    _, stats = step(method(), batch(X_L, Y_L, X_U, X_SECOND, padding=torch.tensor([[255, 0]])))  # outside it: kept
    assert stats["net1/loss_cps"].item() == pytest.approx((LN(8) + LN(4)) / 2)


@pytest.mark.usefixtures("first_pixel_boxed")
@pytest.mark.parametrize("cps_weight", [0.0, 1.5])
def test_lambda_weighs_the_cross_terms_only(cps_weight):
    losses, stats = step(method(cps_weight=cps_weight), batch(X_L, Y_L, X_U, X_SECOND))
    for name in ("net1", "net2"):
        expected = stats[f"{name}/loss_l"] + cps_weight * stats[f"{name}/loss_cps"]
        assert losses[name].item() == pytest.approx(expected.item())


@pytest.mark.usefixtures("first_pixel_boxed")
def test_each_loss_reaches_its_own_network_only():
    """A pseudo-label is an argmax: L_1 has no gradient for net2 and L_2 none for net1, so the two updates
    give each network the gradient of L = L_1 + L_2."""
    m = method()
    losses, _ = step(m, batch(X_L, Y_L, X_U, X_SECOND))
    own, other = torch.autograd.grad(losses["net1"], [m.net1.w, m.net2.w], allow_unused=True, retain_graph=True)
    assert own is not None and own != 0 and other is None
    own, other = torch.autograd.grad(losses["net2"], [m.net2.w, m.net1.w], allow_unused=True)
    assert own is not None and own != 0 and other is None


def test_the_two_networks_start_apart_and_the_first_is_reported():
    torch.manual_seed(0)
    m = CPS(partial(TinySegmenter, 3))
    assert m.reported == "net1" and set(m.trained_models()) == set(m.evaluated_models()) == {"net1", "net2"}
    assert not torch.equal(m.net1.head.weight, m.net2.head.weight)


def test_inspect_shows_both_pseudo_labels_and_where_they_differ_and_changes_nothing():
    torch.manual_seed(0)
    m = CPS(partial(TinySegmenter, 3))
    batch = make_batch()
    batch.unlabeled_mask[:, :, 6:] = 255  # two columns of crop padding
    before = snapshot(m.state_dict().values())
    rng = torch.get_rng_state()
    maps = m.inspect(batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(m.state_dict().values()), strict=True))
    assert list(maps) == ["pseudo-label net1", "pseudo-label net2", "disagree"]
    one, two, disagree = maps.values()
    padding = batch.unlabeled_mask == 255
    assert (one[padding] == 255).all() and (two[padding] == 255).all() and not disagree[padding].any()
    assert torch.equal(disagree, ~padding & (one != two)) and disagree.any()


def test_box_masks_cover_25_to_50_percent_in_one_box():
    torch.manual_seed(0)
    masks = box_masks(4000, 100, 100, boxes=1, area=(0.25, 0.5), device=torch.device("cpu"))
    area = masks.flatten(1).float().mean(1)
    assert area.min() >= 0.23 and area.max() <= 0.52  # rounding the sides moves an area by a row and a column
    assert 0.36 < area.mean() < 0.39  # uniform over [0.25, 0.5]: 0.375
    rows, cols = masks.any(2).sum(1), masks.any(1).sum(1)
    assert (rows * cols == masks.flatten(1).sum(1)).all()  # one rectangle each
    aspect = rows.float() / cols.float()
    assert aspect.min() < 0.5 and aspect.max() > 2  # the aspect ratio varies: s_h = s^u spans [s, 1]


def test_box_masks_split_the_area_over_boxes_and_overlaps_cancel():
    torch.manual_seed(0)
    masks = box_masks(2000, 60, 60, boxes=3, area=(0.25, 0.5), device=torch.device("cpu"))
    area = masks.flatten(1).float().mean(1)
    # three boxes of a third of 0.375 on average; a pixel two boxes cover is out, so overlaps count twice against it
    assert area.max() <= 0.52 and 0.22 < area.mean() < 0.3
    rows, cols = masks.any(2).sum(1), masks.any(1).sum(1)
    assert (rows * cols != masks.flatten(1).sum(1)).float().mean() > 0.9  # mostly not one rectangle
    assert not box_masks(10, 8, 8, boxes=0, area=(0.25, 0.5), device=torch.device("cpu")).any()


# --- exact resume ---------------------------------------------------------------------------------------


def trainer(source, run_dir, logger=None):
    """CPS on the tiny network for ITERS iterations of 2 + 2 (+ 2) images."""
    loaders = build_loaders(source, select_split(source, SPLIT), 2, 0, seed=0, need_unlabeled=True,
                            second_unlabeled=True)
    torch.manual_seed(0)
    method = CPS(partial(TinySegmenter, 6), 255, cps_weight=1.5)
    return contract_trainer(source, loaders, method, run_dir, logger)


def test_a_stopped_run_resumes_exactly(source, tmp_path):
    """The second stream and the boxes are drawn again exactly after a resume; both networks and both
    optimisers end as uninterrupted."""
    _, resumed = stopped_and_resumed(partial(trainer, source), tmp_path, 3)
    assert "train/net2/loss_cps" in resumed.logger.metrics[ITERS]


# --- the command and the recipes ------------------------------------------------------------------------


@pytest.mark.slow
def test_python_m_gta_train_method_cps(tmp_path):
    from helpers import gta

    result = gta("train", "method=cps", *tiny(tmp_path / "data", iters=3), f"hydra.run.dir={tmp_path / 'run'}")
    assert "CPS on SyntheticShapes" in result.stdout and "val mIoU net1" in result.stdout
    assert "net2" in result.stdout and (tmp_path / "run" / "net1.pt").is_file()


@pytest.mark.usefixtures("hydra_conf")
@pytest.mark.parametrize(("dataset", "expected", "method"), [
    ("pascal_voc", {"model.output_stride": ("8", "16"), "dataset.crop_size": ("513", "512"),
                    "data.batch_size": ("3", "2"), "optimizer.lr": ("0.001", "0.005"), "trainer.epochs": ("80", "34"),
                    "trainer.decoder_lr_mult": ("10.0", "1.0"), "eval.mode": ("center_crop", "whole")},
     {"cps_weight": 1.0, "boxes": 3, "box_area": [0.25, 0.5], "ohem_thresh": None}),
    ("pascal_voc_aug", {"model.output_stride": ("8", "16"), "dataset.crop_size": ("513", "512"),
                        "data.batch_size": ("3", "2"), "optimizer.lr": ("0.001", "0.005"),
                        "trainer.epochs": ("80", "34"), "trainer.decoder_lr_mult": ("10.0", "1.0"),
                        "eval.mode": ("center_crop", "whole")},
     {"cps_weight": 1.0, "ohem_thresh": None}),
    ("cityscapes", {"model.output_stride": ("8", "16"), "dataset.crop_size": ("769", "800"),
                    "optimizer.lr": ("0.01", "0.04"), "optimizer.weight_decay": ("0.0005", "0.0001"),
                    "trainer.epochs": ("200", "137"), "trainer.decoder_lr_mult": ("10.0", "1.0"),
                    "eval.crop_size": ("769", "800"), "eval.stride": ("513", "533")},
     {"cps_weight": 5.0, "ohem_thresh": 0.7, "ohem_min_kept": 100000}),
])  # fmt: skip
def test_cpss_recipe_differs_from_gta_segs_where_its_released_one_does(dataset, expected, method):
    """``dataset=D method=cps``: CPS's recipe on the same dataset and labeled list; the command line still wins."""
    from hydra import compose
    from test_unimatch import differences

    gta_seg = compose("train", overrides=[f"dataset={dataset}"])
    two = compose("train", overrides=[f"dataset={dataset}", "method=cps"])
    assert differences(gta_seg, two) == expected
    assert {k: two.method[k] for k in method} == method and two.split == gta_seg.split
    assert compose("train", overrides=[f"dataset={dataset}", "method=cps", "method.cps_weight=1.5"]).method.cps_weight == 1.5
