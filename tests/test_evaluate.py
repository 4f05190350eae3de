"""Evaluation protocols, the models evaluated, and confusion matrices across processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from evalnet import PixelNet, evaluate_share
from helpers import ITERS, assert_same_state, make_trainer
from torch import nn

from gta.engine.evaluate import EvalProtocol, confusion_matrices, predict_logits, sliding_logits


@pytest.fixture()
def net() -> PixelNet:
    torch.manual_seed(0)
    return PixelNet().eval()


def test_sliding_window_equals_whole_image_when_one_window_covers_it(net):
    image = torch.randn(2, 3, 37, 45)
    whole = predict_logits(net, image, EvalProtocol("whole"), 3)
    for window in (45, 64):  # exactly the image, or larger than it
        sliding = predict_logits(net, image, EvalProtocol("sliding", crop_size=window, stride=window), 3)
        torch.testing.assert_close(sliding, whole)


def test_sliding_window_averages_logits_over_overlaps(net):
    image = torch.randn(1, 3, 20, 30)
    logits = sliding_logits(net, image, window=20, stride=6, num_classes=3)
    # windows start at columns 0, 6 and 10 (the last one flush with the border)
    expected = torch.zeros(1, 3, 20, 30)
    counts = torch.zeros(1, 1, 20, 30)
    for left in (0, 6, 10):
        expected[..., left : left + 20] += net(image[..., left : left + 20])
        counts[..., left : left + 20] += 1
    assert counts.min() == 1 and counts.max() == 3
    torch.testing.assert_close(logits, expected / counts)


def test_sliding_stride_larger_than_window_is_refused():
    with pytest.raises(ValueError, match="eval.stride=600 > eval.crop_size=513"):
        EvalProtocol("sliding", crop_size=513, stride=600)
    with pytest.raises(ValueError, match="eval.mode"):
        EvalProtocol("tiles")


def test_center_crop_scores_only_the_center():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.stack([torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)  # always class 0

    mask = torch.ones(1, 10, 10, dtype=torch.long)
    mask[:, 3:7, 3:7] = 0
    batches = [(torch.zeros(1, 3, 10, 10), mask)]
    cpu = torch.device("cpu")
    center = EvalProtocol("center_crop", crop_size=4)
    crop = confusion_matrices({"m": Constant()}, batches, 2, 255, center, cpu)
    assert crop["m"].tolist() == [[16, 0], [0, 0]]
    whole = confusion_matrices({"m": Constant()}, batches, 2, 255, EvalProtocol("whole"), cpu)
    assert whole["m"].tolist() == [[16, 0], [84, 0]]


def test_center_crop_pads_small_images_with_pad_label():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)  # always class 1

    batches = [(torch.zeros(1, 3, 3, 5), torch.ones(1, 3, 5, dtype=torch.long))]
    cpu = torch.device("cpu")
    padded = confusion_matrices({"m": Constant()}, batches, 2, 255, EvalProtocol("center_crop", 6, pad_label=0), cpu)
    # 15 real pixels of class 1, and 36 - 15 padding pixels that count as class 0 (docs/algorithm.md §5.8)
    assert padded["m"].tolist() == [[0, 21], [0, 15]]
    plain = confusion_matrices({"m": Constant()}, batches, 2, 255, EvalProtocol("center_crop", 6), cpu)
    assert plain["m"].tolist() == [[0, 0], [0, 15]]


def test_confusion_matrix_ignores_255():
    class Perfect(nn.Module):
        def forward(self, x):
            return x[:, :2]

    mask = torch.tensor([[[0, 1, 255, 255]]])
    image = torch.nn.functional.one_hot(mask.clamp_max(1), 2).permute(0, 3, 1, 2).float()
    image = torch.cat([image, image[:, :1]], 1)
    cm = confusion_matrices({"m": Perfect()}, [(image, mask)], 2, 255, EvalProtocol(), torch.device("cpu"))
    assert cm["m"].tolist() == [[1, 0], [0, 1]]


def test_eval_models_selects_what_is_evaluated():
    models = {"teacher": nn.Identity(), "student": nn.Identity(), "assistant": nn.Identity()}
    assert list(EvalProtocol().select(models, "teacher")) == ["teacher"]
    assert list(EvalProtocol(models="all").select(models, "teacher")) == ["teacher", "student", "assistant"]
    assert list(EvalProtocol(models=["assistant"]).select(models, "teacher")) == ["teacher", "assistant"]
    assert list(EvalProtocol(models="student").select(models, "teacher")) == ["teacher", "student"]
    with pytest.raises(ValueError, match=r"\['gta'\].*'teacher', 'student', 'assistant'"):
        EvalProtocol(models=["gta"]).select(models, "teacher")


@pytest.mark.slow
def test_confusion_matrices_are_summed_across_processes(tmp_path):
    """Two processes with disjoint shares of 5 images (3 and 2, as build_val_loader deals them) add up to
    the one-process matrix exactly: nothing padded, nothing counted twice."""
    torch.manual_seed(0)
    batches = [(torch.randn(1, 3, 8, 8), torch.randint(0, 3, (1, 8, 8))) for _ in range(5)]
    torch.save({"batches": batches, "net": PixelNet().state_dict()}, tmp_path / "inputs.pt")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned processes
    mp.spawn(evaluate_share, args=(2, str(tmp_path)), nprocs=2, join=True)
    net = PixelNet()
    net.load_state_dict(torch.load(tmp_path / "inputs.pt", weights_only=True)["net"])
    single = confusion_matrices({"m": net}, batches, 3, 255, EvalProtocol(), torch.device("cpu"))["m"]
    assert single.sum() == 5 * 64
    for rank in (0, 1):  # every rank ends with the global matrix
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), single)


def test_evaluating_leaves_the_training_as_it_was(source, tmp_path):
    """A run trains the same whether it evaluates every iteration or only at its end: evaluation draws
    nothing from the random numbers training uses (CutMix boxes, dropout)."""
    trained = {}
    for every in (0, 1):
        trainer = make_trainer(source, tmp_path / f"every{every}", eval_every=every)
        trainer.fit()
        trained[every] = trainer.method.state_dict()
        assert len(trainer.history) == (ITERS if every else 1)
    assert_same_state(trained[0], trained[1])
