"""Fundus + OCT late fusion: two encoders trained in earlier runs, frozen (weights and BatchNorm
statistics), their embeddings concatenated, an MLP head on top. Input B x 2 x C x H x W
(fundus, oct)."""

from __future__ import annotations

import torch
from torch import nn


class LateFusionNet(nn.Module):
    def __init__(
        self,
        fundus: nn.Module,
        oct_encoder: nn.Module,
        num_classes: int,
        hidden: int = 256,
        dropout: float = 0.2,
        oct_in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.fundus, self.oct = fundus, oct_encoder
        self.oct_in_chans = oct_in_chans
        for p in [*fundus.parameters(), *oct_encoder.parameters()]:
            p.requires_grad_(False)
        width = int(fundus.num_features) + int(oct_encoder.num_features)  # type: ignore[arg-type]
        self.head = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def train(self, mode: bool = True) -> LateFusionNet:
        super().train(mode)
        self.fundus.eval()  # frozen encoders keep their BatchNorm statistics
        self.oct.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        oct_x = x[:, 1].mean(1, keepdim=True) if self.oct_in_chans == 1 else x[:, 1]
        with torch.no_grad():
            return torch.cat([self.fundus(x[:, 0]), self.oct(oct_x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
