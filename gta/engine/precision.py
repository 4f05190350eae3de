"""Numeric precision of training and evaluation (``trainer.precision``).

``fp32`` runs as written. ``bf16`` and ``fp16`` run the forwards under ``torch.autocast`` on the run's
device: matrix products and convolutions in the lower precision, reductions and losses in float32 (the
methods also cast logits to float32 before every softmax and cross-entropy). ``fp16`` has too few exponent
bits for small gradients, so each optimiser gets a ``torch.amp.GradScaler`` that scales its loss before
backward and skips steps whose gradients overflowed; its state is part of the checkpoint.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager

import torch

from gta.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device) -> None:
        if name not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {tuple(PRECISIONS)}, got '{name}'")
        self.name, self.device, self.dtype = name, device, PRECISIONS[name]
        if self.dtype is not None:
            check_supported(name, self.dtype, device)

    @property
    def scales_losses(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self) -> AbstractContextManager:
        """Where forwards run: autocast to the precision's dtype (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def full(self) -> AbstractContextManager:
        """Autocast off, for backward and optimiser steps taken inside a forward's autocast region."""
        return torch.autocast(self.device.type, enabled=False)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type)


def check_supported(name: str, dtype: torch.dtype, device: torch.device) -> None:
    """Fail naming the setting and the device when autocast to ``dtype`` does not work there."""
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported(False):
        raise ConfigError(
            f"trainer.precision={name}: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic; "
            "use trainer.precision=fp16 (with loss scaling) or fp32"
        )
    # Where autocast lacks the dtype it warns and runs in float32, or raises: try a product instead.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                product = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except RuntimeError as err:
        product, reason = None, str(err).splitlines()[0]
    else:
        reason = f"autocast computed a product in {product.dtype}"
    if product is None or product.dtype != dtype:
        raise ConfigError(
            f"trainer.precision={name}: torch {torch.__version__} cannot autocast to {dtype} on {device} "
            f"({reason}); use trainer.precision=fp32 or another device"
        )
