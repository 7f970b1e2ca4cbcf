"""Losses by name. Focal loss down-weights easy examples (Lin et al. 2017); the ODIR hybrid mixes it
with a positive-weighted BCE for the rare labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * bce).mean()


def softmax_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    return (-alpha * (1 - logp.exp()) ** gamma * logp).mean()


def pos_weight_from_histogram(
    histogram: dict[str, int], count: int, classes: tuple[str, ...], cap: float = 100.0
) -> torch.Tensor:
    """negatives / positives per class from the manifest's train histogram (1 where no positive)."""
    pos = torch.tensor([float(histogram.get(c, 0)) for c in classes])
    w = torch.where(pos > 0, (count - pos) / pos.clamp(min=1), torch.ones_like(pos))
    return w.clamp(1.0 / cap, cap)
