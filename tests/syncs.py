"""Operations that make the host wait for the device, recorded as they are dispatched (on any device)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: operations whose output size depends on the data: on CUDA the host must wait for it to allocate them
DATA_DEPENDENT = {
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
}
#: indexing with a boolean mask goes through nonzero
MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostSyncs(TorchDispatchMode):
    """Records every dispatched operation that, on CUDA, blocks the host until the device catches up:
    reading a value on the host (``item``, ``float``, ``int``, ``bool``: ``aten._local_scalar_dense``)
    and operations with a data-dependent output size (``nonzero``, boolean-mask indexing, ...).

    It runs on the CPU, so the test needs no GPU. What it cannot see: a copy of a tensor that already
    lives on the host (``tolist``, ``.cpu()``, ``.numpy()`` of a CPU tensor) dispatches nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default or func in DATA_DEPENDENT or (
            func in MASK_INDEXED and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None
            )
        ):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
