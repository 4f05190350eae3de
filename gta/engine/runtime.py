"""Process-level set-up: device choice, CUDA settings, seeding and a writable run directory."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from gta.errors import ConfigError, UnwritablePathError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"device must be one of {DEVICES} (or cuda:N), got '{name}'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} was requested but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device=cpu or device=auto"
        )
    return torch.device(name)


def configure_cuda(device: torch.device, cudnn_benchmark: bool = True) -> None:
    """On a GPU: float32 matrix products and convolutions in TF32 (tensor cores, 10-bit mantissa), and
    with ``cudnn_benchmark`` cuDNN times its algorithms for each new input shape and keeps the fastest
    (worth it when shapes repeat, as training crops do). Nothing changes on the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.cudnn.benchmark = cudnn_benchmark


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def ensure_writable(directory: Path) -> Path:
    """Fail before any work is done if the run directory cannot hold the run's files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnwritablePathError(f"cannot create the run directory {directory}: {err.strerror}") from err
    if not os.access(directory, os.W_OK):
        raise UnwritablePathError(
            f"the run directory {directory} is not writable; choose another with hydra.run.dir=..."
        )
    return directory
