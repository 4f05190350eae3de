"""A tiny network that offers what the contract asks of a segmentation network (gta.contract.SegmentationNetwork),
so algorithm tests run in milliseconds."""

from __future__ import annotations

import torch
from torch import nn


class TinySegmenter(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Conv2d(6, num_classes, 1)

    def forward(self, x: torch.Tensor, mask_predictor: nn.Module | None = None) -> torch.Tensor:
        return (mask_predictor or self.head)(self.features(x))

    def perturbed_forward(self, x: torch.Tensor, perturb) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(torch.cat([features, perturb(features)])).chunk(2)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(features), features

    def feature_channels(self) -> int:
        return 6

    def new_mask_predictor(self) -> nn.Module:
        return nn.Conv2d(6, self.head.out_channels, 1)

    def feature_extractor_parameters(self) -> list[nn.Parameter]:
        return list(self.features.parameters())

    def mask_predictor_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def param_groups(self, decoder_lr_mult: float) -> list[dict]:
        return [{"params": list(self.parameters()), "lr_mult": 1.0, "name": "all"}]
