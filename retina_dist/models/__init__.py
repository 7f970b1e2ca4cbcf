"""Models from the config: any timm backbone, the ODIR dual-eye net, fundus+OCT late fusion.
Models know nothing of DDP or DeepSpeed."""

from __future__ import annotations

import logging

import torch
from torch import nn

from retina_dist.config import ModelConfig
from retina_dist.models.backbone import create, head_prefix, load_pretrained, read_weights
from retina_dist.models.dual_eye import DualEyeNet
from retina_dist.models.late_fusion import LateFusionNet
from retina_dist.models.pretrained import LoadReport

__all__ = ["build_model", "load_pretrained", "backbone_parameters", "DualEyeNet", "LateFusionNet"]
log = logging.getLogger(__name__)


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    in_chans: int,
    image_size: int = 0,
    reports: list[LoadReport] | None = None,
    heads: tuple[int, ...] = (),
) -> nn.Module:
    """The model of ``cfg`` for inputs of ``image_size`` (ViTs are built for it, and pretrained
    pos_embed resampled to it); each pretrained load's report is appended to ``reports``.
    ``heads``: a multi-head task's columns per head (the late-fusion net gets one output layer each)."""
    loads: list[LoadReport] = [] if reports is None else reports
    if cfg.arch == "dual_eye":
        backbone = create(
            cfg.name, 0, in_chans, cfg.drop_path, cfg.grad_checkpointing, image_size, cfg.global_pool
        )
        if cfg.pretrained:
            loads.append(load_pretrained(backbone, cfg.pretrained))
        if cfg.freeze_backbone:
            backbone.requires_grad_(False)
        model: nn.Module = DualEyeNet(backbone, num_classes, cfg.embed_dim, cfg.heads)
    elif cfg.arch == "late_fusion":
        model = _late_fusion(cfg, num_classes, loads, heads)
    else:
        model = create(
            cfg.name,
            num_classes,
            in_chans,
            cfg.drop_path,
            cfg.grad_checkpointing,
            image_size,
            cfg.global_pool,
        )
        if cfg.pretrained:
            loads.append(load_pretrained(model, cfg.pretrained))
        if cfg.freeze_backbone:
            head = head_prefix(model)
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(f"{head}."))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()  # in place: state_dict keys stay unprefixed, so checkpoints are unchanged
    return model


def _late_fusion(
    cfg: ModelConfig, num_classes: int, loads: list[LoadReport], heads: tuple[int, ...]
) -> nn.Module:
    encoders = []
    for which, name, source in (
        ("fundus", cfg.fundus_name, cfg.fundus_encoder),
        ("oct", cfg.oct_name, cfg.oct_encoder),
    ):
        state = read_weights(source) if source else None
        chans = _in_chans(state) if state else 3
        enc = create(name, 0, chans)
        if state is None:
            log.warning(
                "late fusion: no model.%s_encoder given; the %s encoder is randomly initialised (and frozen)",
                which,
                which,
            )
        else:
            loads.append(load_pretrained(enc, state))
        encoders.append((enc, chans))
    (fundus, _), (oct_enc, oct_chans) = encoders
    return LateFusionNet(fundus, oct_enc, num_classes, cfg.embed_dim, oct_in_chans=oct_chans, heads=heads)


def _in_chans(state: dict[str, torch.Tensor]) -> int:
    """The input channels of a saved CNN/ViT: the first 4-D weight's second dimension."""
    first = next(v for v in state.values() if v.ndim == 4)
    return int(first.shape[1])


def backbone_parameters(model: nn.Module) -> set[int]:
    """ids of the backbone's parameters (those that take ``optim.backbone_lr_mult``)."""
    if isinstance(model, DualEyeNet):
        return {id(p) for p in model.backbone.parameters()}
    if isinstance(model, LateFusionNet):
        return set()
    prefix = head_prefix(model)
    return {id(p) for n, p in model.named_parameters() if not n.startswith(prefix)}
