"""ODIR dual-eye model: one shared backbone for both eyes, per-eye projections, cross-attention in
which each eye attends to the other's spatial tokens, and a head over [left, right, left<-right,
right<-left]. Input B x 2 x C x H x W (left, right)."""

from __future__ import annotations

import torch
from torch import nn

from retina_dist.models.backbone import tokens


class DualEyeNet(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        embed_dim: int = 256,
        heads: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.backbone = backbone  # timm, num_classes=0
        width = int(backbone.num_features)  # type: ignore[arg-type]  # timm's attribute
        self.proj = nn.ModuleDict(
            {
                eye: nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
                for eye in ("left", "right")
            }
        )
        self.cross = nn.MultiheadAttention(embed_dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Sequential(
            nn.Linear(4 * embed_dim, embed_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(embed_dim, num_classes),
        )

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-eye token embeddings, the cross-attended views and the attention weights."""
        n = x.shape[0]
        both = tokens(self.backbone, torch.cat([x[:, 0], x[:, 1]]))  # one pass through the shared backbone
        left, right = self.proj["left"](both[:n]), self.proj["right"](both[n:])
        l_from_r, attn_lr = self.cross(left, right, right, need_weights=True)
        r_from_l, attn_rl = self.cross(right, left, left, need_weights=True)
        return {
            "left": left,
            "right": right,
            "left_from_right": self.norm(l_from_r),
            "right_from_left": self.norm(r_from_l),
            "attn_left_to_right": attn_lr,
            "attn_right_to_left": attn_rl,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encode(x)
        z = torch.cat([e[k].mean(1) for k in ("left", "right", "left_from_right", "right_from_left")], dim=1)
        return self.head(z)
