"""Fundus + OCT late fusion: two encoders trained in earlier runs, frozen (weights and BatchNorm
statistics), their embeddings concatenated, an MLP head on top. Input B x 2 x C x H x W
(fundus, oct). With ``heads`` (columns per head, e.g. 5 DR grades and 4 OCT classes) the MLP's
hidden layer is shared and each head has its own output layer; their logits are concatenated in
head order, one softmax each (``tasks.Task``)."""

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
        heads: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.fundus, self.oct = fundus, oct_encoder
        self.oct_in_chans = oct_in_chans
        for p in [*fundus.parameters(), *oct_encoder.parameters()]:
            p.requires_grad_(False)
        width = int(fundus.num_features) + int(oct_encoder.num_features)  # type: ignore[arg-type]
        if heads and sum(heads) != num_classes:
            raise ValueError(f"heads {heads} do not add up to {num_classes} classes")
        trunk = [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        self.head = nn.Sequential(*trunk) if heads else nn.Sequential(*trunk, nn.Linear(hidden, num_classes))
        self.outputs = nn.ModuleList(nn.Linear(hidden, n) for n in heads)

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
        h = self.head(self.embed(x))
        return torch.cat([out(h) for out in self.outputs], dim=1) if len(self.outputs) else h
