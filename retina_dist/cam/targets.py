"""Which layer to explain, per timm family, and the ViT token -> grid reshape."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def target_layer(model: nn.Module, override: str = "") -> nn.Module:
    if override:
        try:
            return model.get_submodule(override)
        except AttributeError as err:
            raise ValueError(f"cam target layer {override!r}: {err}") from None
    for attr in ("stages", "layer4", "conv_head", "blocks", "features"):
        if hasattr(model, attr):
            layer = getattr(model, attr)
            if attr == "stages":  # ConvNeXt / many timm CNNs: the last stage
                return layer[-1]
            if attr == "blocks" and is_vit(model):  # ViT: the last block's first norm, on tokens
                return layer[-1].norm1
            if attr == "features":  # our small CNN
                return layer[-1]
            return layer  # ResNet layer4, EfficientNet conv_head
    raise ValueError(f"no default CAM target layer for {type(model).__name__}; set cam.target_layer")


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def vit_reshape(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Tokens B x (prefix + h*w) x C -> B x C x h x w, dropping class/register tokens."""
    if not is_vit(model):
        return None
    prefix = getattr(model, "num_prefix_tokens", 1)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        t = t[:, prefix:, :]
        side = int(math.isqrt(t.shape[1]))
        return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

    return reshape
