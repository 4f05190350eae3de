"""A tiny network for evaluation tests and the per-process worker of the distributed test (kept apart
from the test module so spawned processes import little)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from gta.engine.evaluate import EvalProtocol, confusion_matrices


class PixelNet(nn.Module):
    """Logits that depend on the pixel and on its position in the window, so window placement matters."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ramp = torch.linspace(0, 1, w).view(1, 1, 1, w) + torch.linspace(0, 1, h).view(1, 1, h, 1)
        return self.conv(x) + ramp


def evaluate_share(rank: int, world_size: int, directory: str) -> None:
    """Rank ``rank`` evaluates its share ``batches[rank::world_size]`` (as build_val_loader deals them)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank, world_size=world_size)
    try:
        inputs = torch.load(f"{directory}/inputs.pt", weights_only=True)
        net = PixelNet()
        net.load_state_dict(inputs["net"])
        share = inputs["batches"][rank::world_size]
        cm = confusion_matrices({"m": net}, share, 3, 255, EvalProtocol(), torch.device("cpu"))["m"]
        torch.save(cm, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
