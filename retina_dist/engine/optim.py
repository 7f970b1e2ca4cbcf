"""The optimizer and its schedule: AdamW groups (weight decay, backbone lr, timm's layer-wise lr
decay), the lr from a base lr, and warmup + cosine."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from retina_dist.config import ConfigError, OptimConfig
from retina_dist.models import backbone_parameters

log = logging.getLogger(__name__)


def effective_lr(o: OptimConfig, effective_batch: int) -> float:
    """``optim.lr``, or with ``optim.blr`` set, blr x effective batch / 256 (the MAE / RETFound rule)."""
    if not o.blr:
        return o.lr
    lr = o.blr * effective_batch / 256
    log.info("lr %.3g = blr %.3g x effective batch %d / 256", lr, o.blr, effective_batch)
    return lr


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    layer_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. Not decayed: 1-D parameters (norms, biases) and what the
    model's ``no_weight_decay()`` names (a ViT's pos_embed and cls_token). ``layer_decay``: timm's
    BEiT-style groups, block k from the top at lr x decay^k; else the backbone may learn at
    ``backbone_lr_mult`` of the head's lr."""
    if layer_decay:
        return torch.optim.AdamW(layer_decay_groups(model, lr, weight_decay, layer_decay), lr=lr)
    backbone = backbone_parameters(model) if backbone_lr_mult != 1.0 else set()
    exempt = no_weight_decay(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in backbone, p.ndim <= 1 or name in exempt), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
            for (in_backbone, no_decay), params in sorted(groups.items())
        ],
        lr=lr,
    )


def no_weight_decay(model: nn.Module) -> set[str]:
    """Full names of the parameters any submodule's ``no_weight_decay()`` lists (timm's convention)."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            out |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return out


def layer_decay_groups(
    model: nn.Module, lr: float, weight_decay: float, decay: float
) -> list[dict[str, Any]]:
    """timm's layer-decay groups (from the model's ``group_matcher``; a dual-eye net's from its
    backbone's, the fusion layers and head at the full lr), each with its lr set."""
    from timm.optim import param_groups_layer_decay

    inner = getattr(model, "backbone", model)
    if not callable(getattr(inner, "group_matcher", None)):
        raise ConfigError(
            f"optim.layer_decay: {type(inner).__name__} has no group_matcher to number its layers by "
            "(timm's ViTs, ConvNeXts, EfficientNets and ResNets have one)"
        )
    groups = param_groups_layer_decay(
        inner, weight_decay, no_weight_decay_list=tuple(no_weight_decay(inner)), layer_decay=decay
    )
    # A headless backbone's top block is timm's top layer; under a dual-eye net's own head it is one
    # below the head, as in the single model.
    shift = decay if inner is not model else 1.0
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale") * shift
    if inner is not model:
        seen = {id(p) for g in groups for p in g["params"]}
        rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        for no_decay in (False, True):
            params = [p for n, p in rest if (p.ndim <= 1) == no_decay]
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else weight_decay})
    return groups


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
