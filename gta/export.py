"""The ``export`` command: a saved model as one file for use outside Python.

``python -m gta export checkpoint=<run_dir>/teacher.pt output=model.pt`` writes TorchScript (load it with
``torch.jit.load`` in Python or ``torch::jit::load`` in C++); ``format=onnx`` writes ONNX and needs the
``onnx`` and ``onnxscript`` packages. Either way the network takes RGB in [0, 1], ``N x 3 x H x W`` with
any H and W, normalises it with the dataset's mean and std, and returns logits ``N x C x H x W``; their
argmax over C is the class id (the class names are in the run's config.yaml).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from gta.errors import ConfigError
from gta.saved import load_model

FORMATS = ("torchscript", "onnx")


class Normalized(nn.Module):
    """The network with the dataset's normalisation in front: RGB in [0, 1] -> logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.model((rgb - self.mean) / self.std)


def export(module: nn.Module, path: Path, fmt: str) -> None:
    """Write ``module`` (in eval mode) to ``path`` as ``fmt``."""
    # A side that is not a multiple of the network's stride, so the recorded graph includes the padding
    # (computed from the input's shape, so it fits every size; padding by zero changes nothing).
    example = torch.rand(1, 3, 65, 65)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            # the tracer warns that the pad-or-not branch is fixed; it is taken, see above
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.jit.trace(module, example).save(str(path))
    else:
        height, width = torch.export.Dim("height", min=1), torch.export.Dim("width", min=1)
        torch.onnx.export(
            module, (example,), str(path), input_names=["rgb"], output_names=["logits"],
            dynamic_shapes={"rgb": {0: torch.export.Dim("batch"), 2: height, 3: width}}, external_data=False,
        )  # fmt: skip


def run(cfg: DictConfig) -> Path:
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, got '{cfg.format}'")
    if cfg.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ImportError(f"format=onnx needs the onnx packages: pip install onnx onnxscript ({err})") from err
    model, run_cfg = load_model(cfg)
    source = instantiate(run_cfg.dataset)  # only its metadata (normalisation, classes); reads no files
    path = Path(cfg.output).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    export(Normalized(model, source.mean, source.std).eval(), path, cfg.format)
    print(f"{path}: {cfg.format}, RGB in [0, 1] (N x 3 x H x W) -> logits (N x {source.num_classes} x H x W), "
          f"classes {', '.join(source.class_names)}")  # fmt: skip
    return path
