"""The ``export`` command: a saved model as one file for use outside this project.

``python -m gta export checkpoint=<run_dir>/teacher.pt output=model.pt2`` writes a ``torch.export`` program
(``torch.export.load(path).module()`` is a callable module; AOTInductor and ExecuTorch compile it further);
``format=onnx`` writes the same program as ONNX and needs the ``onnx`` and ``onnxscript`` packages. Either
way the network takes RGB in [0, 1], ``N x 3 x H x W`` with any N, H and W, normalises it with the
dataset's mean and std, and returns logits ``N x C x H x W``; their argmax over C is the class id (the class
names are in the run's config.yaml).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import timm.layers.padding
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.fx.experimental import _config as symbolic_shapes

from gta.errors import ConfigError
from gta.saved import load_model

FORMATS = ("pt2", "onnx")


class Normalized(nn.Module):
    """The network with the dataset's normalisation in front: RGB in [0, 1] -> logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.model((rgb - self.mean) / self.std)


@contextmanager
def integer_same_padding() -> Iterator[None]:
    """timm's "same" padding (the pooling of dilated ResNet stages, as in ResNet-10-T at output stride 16)
    rounds ``size / stride`` up with ``math.ceil``, an operation a saved program cannot hold when the size is
    free; the same padding computed in integer arithmetic can."""

    def same_padding(size: int, kernel_size: int, stride: int, dilation: int) -> int:
        return max((-(-size // stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)

    with mock.patch.object(timm.layers.padding, "get_same_padding", same_padding):
        yield


def program(module: nn.Module) -> ExportedProgram:
    """``module`` (in eval mode) traced by ``torch.export`` with a free batch size, height and width."""
    # A side that is not a multiple of the network's stride, so that the padding is traced where it acts.
    example = torch.rand(2, 3, 65, 65)
    sizes = {"rgb": {0: Dim("batch", min=1), 2: Dim("height", min=1), 3: Dim("width", min=1)}}
    # Without size-oblivious reasoning torch.export assumes every free size is at least 2 and refuses a batch
    # of one image; the network treats sizes 0 and 1 as any other (torch's documented, experimental switch).
    with symbolic_shapes.patch(backed_size_oblivious=True), integer_same_padding():
        return torch.export.export(module, (example,), dynamic_shapes=sizes)


def export(module: nn.Module, path: Path, fmt: str) -> None:
    """Write ``module`` (in eval mode) to ``path`` as ``fmt``."""
    exported = program(module)
    if fmt == "pt2":
        torch.export.save(exported, path)
    else:
        torch.onnx.export(exported, f=str(path), input_names=["rgb"], output_names=["logits"], external_data=False)


def run(cfg: DictConfig) -> Path:
    if cfg.format not in FORMATS:
        dropped = " (TorchScript is no longer written: torch.jit.trace is deprecated)" \
            if cfg.format == "torchscript" else ""
        raise ConfigError(f"format must be one of {FORMATS}, got '{cfg.format}'{dropped}")
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
