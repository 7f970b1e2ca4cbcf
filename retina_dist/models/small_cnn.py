"""A small CNN for 28-px OCTMNIST (MedMNIST-scale inputs, where ImageNet stems downsample too much)."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    default_cfg = {"classifier": "fc"}  # noqa: RUF012 - timm's convention, read by load_pretrained

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 32, drop: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_chans, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
        )
        self.num_features = 4 * width
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.forward_features(x).mean((2, 3))))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # too small to need it
