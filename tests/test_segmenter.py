"""The network at the paper's crop sizes and output strides, and encoder weights from a local file."""

from __future__ import annotations

import pytest
import torch

from gta.models import Segmenter


@pytest.mark.parametrize(("size", "output_stride"), [(513, 8), (513, 16), (769, 16)])
def test_segmenter_pads_and_crops_back_the_papers_crop_sizes(size, output_stride):
    torch.manual_seed(0)
    model = Segmenter(4, encoder_name="tu-resnet10t", output_stride=output_stride, decoder_channels=16).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size - 2))
    assert logits.shape == (1, 4, size, size - 2)


def test_encoder_weights_from_a_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    classifier = timm.create_model("resnet10t", num_classes=5)  # an ImageNet-style checkpoint, with its fc
    torch.save(classifier.state_dict(), tmp_path / "resnet10t.pth")
    save_file(classifier.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    for name in ("resnet10t.pth", "resnet10t.safetensors"):
        path = str(tmp_path / name)
        model = Segmenter(3, encoder_name="tu-resnet10t", weights_path=path, decoder_channels=16)
        torch.testing.assert_close(model.net.encoder.model.conv1[0].weight, classifier.conv1[0].weight)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth does not fit the tu-resnet10t encoder"):
        Segmenter(3, encoder_name="tu-resnet10t", weights_path=str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="model.weights_path"):
        Segmenter(3, encoder_name="tu-resnet10t", weights_path=str(tmp_path / "absent.pth"))


def test_imagenet_weights_for_timm_encoders_come_from_the_name(monkeypatch):
    """smp wants ``encoder_weights=True`` for ``tu-`` encoders (the tag is part of the name); our config
    says "imagenet" for every encoder."""
    import gta.models.segmenter as segmenter

    seen = {}
    create = segmenter.smp.create_model

    def offline(*args, encoder_weights=None, **kwargs):
        seen["weights"] = encoder_weights
        return create(*args, encoder_weights=None, **kwargs)  # nothing is downloaded in tests

    monkeypatch.setattr(segmenter.smp, "create_model", offline)
    Segmenter(3, encoder_name="tu-resnet10t", encoder_weights="imagenet", decoder_channels=16)
    assert seen["weights"] is True
    Segmenter(3, encoder_name="resnet18", encoder_weights="imagenet", decoder_channels=16)
    assert seen["weights"] == "imagenet"
