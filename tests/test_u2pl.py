"""U2PL pinned down equation by equation: the reliable pixels and L_u's scaling, the percentiles that move over
training, the contrastive loss's anchors, positive and negatives (labeled and unreliable ones), the queues (their
sizes, their state in a checkpoint, gathered across processes), the teacher's EMA of both heads, the decoder's
features, exact resume, the command and the recipes."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from helpers import (
    ITERS,
    SPLIT,
    contract_trainer,
    free_port,
    make_batch,
    sgd_update,
    snapshot,
    stopped_and_resumed,
    tiny,
)
from tiny import TinySegmenter

from gta.contract import Progress
from gta.data import build_loaders, select_split
from gta.errors import ContractError
from gta.methods import U2PL
from gta.methods.ema import EMA
from gta.methods.u2pl import Memory, gather

LN = math.log


def method(classes: int = 3, **options) -> U2PL:
    torch.manual_seed(0)
    return U2PL(partial(TinySegmenter, classes), EMA(0.9, ramp=False), **options)


def test_l_u_keeps_the_pixels_below_the_percentile_and_scales_by_all_over_reliable():
    """Entropies 0.1, 0.2, 0.3, 0.4 on four pseudo-labelled pixels, one pixel of padding: at percent 25 the
    threshold is the 75th percentile, 0.325 (linear), so the first three are reliable; L_u = Σ CE / 3 x 5 / 3."""
    m = method()
    logits = torch.tensor([[0.0, LN(3)], [LN(3), 0.0], [0.0, 0.0], [0.0, 5.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 5)
    label = torch.tensor([[[1, 1, 0, 1, 255]]])
    uncertainty = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.0]]])
    loss, reliable = m.unlabeled_loss(logits, label, uncertainty, percent=25.0)
    assert reliable.tolist() == [[[True, True, True, False, False]]]
    assert loss.item() == pytest.approx((LN(4 / 3) + LN(4) + LN(2)) / 3 * 5 / 3)
    _, everything_but_the_largest = m.unlabeled_loss(logits, label, uncertainty, percent=0.0)
    assert everything_but_the_largest.sum() == 3  # at 0 % the released threshold is the largest, which is dropped


def test_the_percentiles_move_linearly_to_zero_over_the_epochs(monkeypatch):
    """At epoch 2 of 4: L_u drops 20 x (1 - 1/2) = 10 % and L_c's reliable / unreliable shares are 10 %."""
    m = method()
    m.hand_over()
    seen = {}

    def unlabeled_loss(logits, label, uncertainty, percent):
        seen["L_u"] = percent
        return logits.sum() * 0, label >= 0

    def contrastive_loss(rep, teacher_rep, probs, labels, n, percent):
        seen["L_c"] = percent
        return rep.sum() * 0

    monkeypatch.setattr(m, "unlabeled_loss", unlabeled_loss)
    monkeypatch.setattr(m, "contrastive_loss", contrastive_loss)
    m.training_step(make_batch(), Progress(5, 2, total=8), sgd_update(m))
    assert seen == {"L_u": 10.0, "L_c": 10.0}


def grid(*images) -> torch.Tensor:
    """B x D x 1 x W from one list of per-pixel vectors per image."""
    return torch.tensor(images).permute(0, 2, 1).unsqueeze(2)


def hand_made():
    """A labeled image (pixel 0: class 0, pixel 1: class 1) and an unlabeled one without pseudo-labels, on a
    1 x 2 grid: the student's representations r, the teacher's r', the teacher's probabilities, the labels."""
    rep = grid([[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]])
    teacher_rep = grid([[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]])
    probs = grid([[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.5, 0.5]])
    labels = torch.tensor([[[0, 1]], [[255, 255]]])
    return rep, teacher_rep, probs, labels


#: InfoNCE of one anchor whose cosines with its positive and its one negative are 1 and 0, at T = 0.5
CLEAR = LN(1 + math.exp(-2))


def test_l_c_of_a_hand_computed_batch():
    """Class 0: anchor r(pixel 0) = (1, 0), positive r'(pixel 0) = (1, 0) (cos 1), negative r'(pixel 1) = (0, 1)
    (cos 0), the labeled pixel of another class where class 0 ranks below low_rank. Class 1: anchor r(pixel 1) =
    (1, 1), positive r'(pixel 1) = (0, 1), negative r'(pixel 0) = (1, 0), both at cos 1/√2: ln 2. Had the
    positive been the student's own r, class 1's term would differ."""
    m = method(queries=1, negatives=1)
    loss = m.contrastive_loss(*hand_made(), 1, percent=20.0)
    assert loss.item() == pytest.approx((CLEAR + LN(2)) / 2)
    queues = m.student.memory.queues
    assert queues[0].tolist() == [[0.0, 1.0]] and queues[1].tolist() == [[1.0, 0.0]]


def test_an_anchor_needs_the_class_probability_above_its_threshold_and_the_positive_is_the_teachers_mean():
    m = method(queries=1, negatives=1, anchor_thresh=0.85)  # class 1's pixel has p = 0.8: no anchor for class 1
    loss = m.contrastive_loss(*hand_made(), 1, percent=20.0)
    assert loss.item() == pytest.approx(CLEAR / 2)  # class 1 counts in the mean, contributes nothing


def test_unreliable_unlabeled_pixels_are_negatives_of_the_classes_ranked_between_low_and_high():
    """An unlabeled pixel pseudo-labelled 0 (the only one, so both the most and the least certain): with ranks
    [1, 2) it is a negative of class 1 (ranked 1st after 0), never of class 0."""
    m = method(queries=1, negatives=1, low_rank=1, high_rank=2)
    rep, teacher_rep, probs, labels = hand_made()
    labels[1, 0, 0] = 0
    teacher_rep[1, :, 0, 0] = torch.tensor([3.0, 4.0])
    probs[1, :, 0, 0] = torch.tensor([0.7, 0.3])
    m.contrastive_loss(rep, teacher_rep, probs, labels, 1, percent=20.0)
    queues = m.student.memory.queues
    assert [3.0, 4.0] in queues[1].tolist() and [3.0, 4.0] not in queues[0].tolist()
    # with low_rank 1 the labeled negatives of class c are the pixels of another class where c ranks first: none
    assert [0.0, 1.0] not in queues[0].tolist()


def test_one_class_in_the_batch_gives_no_contrastive_loss_but_fills_the_queues():
    m = method(queries=1, negatives=1)
    rep, teacher_rep, probs, labels = hand_made()
    labels[0, 0, 1] = 255
    loss = m.contrastive_loss(rep, teacher_rep, probs, labels, 1, percent=20.0)
    assert loss.item() == 0.0 and loss.requires_grad is rep.requires_grad


def test_the_queues_keep_the_newest_keys_up_to_their_sizes_and_are_the_memorys_state():
    memory = Memory(size=3, background_size=5)
    for step in range(3):
        memory.push([torch.full((2, 4), float(step)), torch.full((2, 4), float(step))])
    assert memory.queues[0][:, 0].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0]  # class 0: the background's size
    assert memory.queues[1][:, 0].tolist() == [1.0, 2.0, 2.0]
    restored = Memory(size=3, background_size=5)
    restored.load_state_dict(memory.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.queues, memory.queues, strict=True))
    assert gather(memory.queues) is memory.queues  # one process: nothing to gather


def test_the_teacher_is_the_plain_network_and_both_heads_are_averaged():
    m = method()
    m.hand_over()
    assert type(m.teacher) is TinySegmenter  # what eval and predict load
    teacher0 = snapshot(m.teacher.parameters())
    rep0 = snapshot(m.student.teacher_representation.parameters())
    m.training_step(make_batch(), Progress(2, 2, total=8), sgd_update(m))
    for t, t0, s in zip(m.teacher.parameters(), teacher0, m.student.model.network.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    pairs = zip(m.student.teacher_representation.parameters(), rep0, m.student.model.representation.parameters(),
                strict=True)
    for t, t0, s in pairs:
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)


def test_a_network_without_decoder_features_is_refused_naming_what_it_lacks():
    class Plain(TinySegmenter):
        forward_features = None

    with pytest.raises(ContractError, match="DecoderFeatures.*Plain lacks forward_features"):
        U2PL(Plain, EMA())


@pytest.mark.usefixtures("hydra_conf")
def test_the_segmenters_features_are_the_mask_predictors_input():
    from hydra import compose
    from hydra.utils import instantiate

    torch.manual_seed(0)
    network = instantiate(compose("train").model).eval()
    x = torch.randn(2, 3, 40, 56)  # padded to the size divisor, the features cropped back to the image
    with torch.no_grad():
        logits, features = network.forward_features(x)
        plain = network(x)
    torch.testing.assert_close(logits, plain)
    assert features.shape == (2, network.feature_channels(), 10, 14)


# --- data parallel: the queues gathered ----------------------------------------------------------------


def _gathered(rank: int, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    memory = Memory(size=10, background_size=10)
    memory.push([torch.full((rank + 1, 2), float(rank)), torch.full((2 - rank, 2), 10.0 + rank)])
    assert memory.queues[0][:, 0].tolist() == [0.0, 1.0, 1.0]  # rank 0's keys first, on every rank
    assert memory.queues[1][:, 0].tolist() == [10.0, 10.0, 11.0]
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_push_the_same_keys_into_every_ranks_queues():
    torch.multiprocessing.spawn(_gathered, args=(free_port(),), nprocs=2)


# --- exact resume ---------------------------------------------------------------------------------------


def trainer(source, run_dir, logger=None):
    """U2PL on the tiny network for ITERS iterations of 2 + 2 images: a warm-up epoch, then three more."""
    loaders = build_loaders(source, select_split(source, SPLIT), 2, 0, seed=0, need_unlabeled=True)
    torch.manual_seed(0)
    trained = U2PL(partial(TinySegmenter, 6), EMA(0.9), queries=4, negatives=3)
    return contract_trainer(source, loaders, trained, run_dir, logger)


def test_a_stopped_run_resumes_exactly_queues_included(source, tmp_path):
    reference, resumed = stopped_and_resumed(partial(trainer, source), tmp_path, 5)
    assert len(reference.method.student.memory.queues) == 6 and len(reference.method.student.memory.queues[1]) > 0
    assert "train/student/loss_c" in resumed.logger.metrics[ITERS]


@pytest.mark.slow
def test_python_m_gta_train_method_u2pl(tmp_path):
    from helpers import gta

    result = gta("train", "method=u2pl", "method.warmup_epochs=0", *tiny(tmp_path / "data", iters=3),
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert "U2PL on SyntheticShapes" in result.stdout and "val mIoU teacher" in result.stdout
    assert (tmp_path / "run" / "teacher.pt").is_file()



# --- recipes --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("hydra_conf")
@pytest.mark.parametrize(("dataset", "expected", "method_values"), [
    ("pascal_voc", {"data.batch_size": ("3", "4")}, {"ohem_thresh": 0.7, "ohem_min_kept": 100000, "warmup_epochs": 1}),
    ("pascal_voc_aug", {"data.batch_size": ("3", "4")}, {"ohem_thresh": 0.7, "warmup_epochs": 1}),
    ("cityscapes", {}, {"ohem_thresh": 0.7, "warmup_epochs": 0}),
])  # fmt: skip
def test_u2pls_recipe_differs_from_gta_segs_where_its_released_one_does(dataset, expected, method_values):
    """``dataset=D method=u2pl``: GTA-Seg's recipes come from U2PL's, so little differs beside the method's own
    settings; the released values of those are the schema's defaults."""
    from hydra import compose
    from test_unimatch import differences

    gta_seg = compose("train", overrides=[f"dataset={dataset}"])
    theirs = compose("train", overrides=[f"dataset={dataset}", "method=u2pl"])
    assert differences(gta_seg, theirs) == expected
    assert {k: theirs.method[k] for k in method_values} == method_values and theirs.split == gta_seg.split
    defaults = {"unreliable": 20.0, "low_entropy": 20.0, "low_rank": 3, "high_rank": 20, "anchor_thresh": 0.3,
                "negative_thresh": 1.0, "queries": 256, "negatives": 50, "temperature": 0.5, "queue_size": 30000,
                "background_queue_size": 50000, "cutmix_prob": 0.5, "unsup_weight": 1.0, "contrastive_weight": 1.0}
    assert {k: theirs.method[k] for k in defaults} == defaults
    assert theirs.ema.alpha == 0.99
