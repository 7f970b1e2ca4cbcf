"""Mixup / CutMix on the device batch, through timm's ``Mixup``: soft targets with label smoothing
(multi-class), or mixed multi-hot vectors each smoothed towards 0.5 (multi-label). A dual-eye batch
(B x 2 x C x H x W) is mixed as pairs: both eyes of a patient take the same partner, the same
lambda and the same CutMix box. timm draws lambda from numpy's and Python's generators, which the
checkpoint's rng state carries, so a resumed run mixes as the uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable

import torch

from retina_dist.config import ConfigError, OptimConfig
from retina_dist.tasks import Task

Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_mix(o: OptimConfig, task: Task, image_size: int) -> Mix | None:
    if not (o.mixup or o.cutmix):
        return None
    if task.loss_name in ("focal", "hybrid") and not task.multilabel:
        raise ConfigError("optim.mixup/cutmix: soft targets need optim.loss=ce (or auto)")
    from timm.data import Mixup

    mixup = Mixup(
        mixup_alpha=o.mixup,
        cutmix_alpha=o.cutmix,
        prob=o.mix_prob,
        switch_prob=o.mix_switch_prob,
        label_smoothing=o.label_smoothing,
        num_classes=task.num_classes,
        multi_label=task.vector_target,
    )

    def mix(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:
            raise ValueError(f"mixup/cutmix needs an even batch, got {len(x)}: set train.batch_size even")
        if x.ndim == 5:  # views as channels: one box and one partner for both eyes
            b, v, c, h, w = x.shape
            flat, target = mixup(x.reshape(b, v * c, h, w), y)
            return flat.reshape(b, v, c, h, w), target
        return mixup(x, y)

    return mix
