"""The stream a run reads, from its config and manifest: one place for the training and evaluation
specs, so the Trainer, ``eval`` and the CAM pass read a split the same way."""

from __future__ import annotations

import logging

import torch

from retina_dist.config import Config
from retina_dist.data.manifest import Manifest, split_shards
from retina_dist.data.stream import StreamSpec, repeat_factors
from retina_dist.tasks import Task

log = logging.getLogger(__name__)


def train_spec(cfg: Config, manifest: Manifest, task: Task, device: torch.device) -> StreamSpec:
    d = cfg.data
    repeat: tuple[float, ...] = ()
    if d.balance == "repeat":
        split = manifest.splits[d.train_split]
        repeat = repeat_factors(split.histogram, split.count, task.classes, d.repeat_thresh)
        log.info("class-balanced sampling, repeat factors %s", dict(zip(task.classes, repeat, strict=True)))
    return StreamSpec(
        tuple(split_shards(d.shards, manifest, d.train_split)),
        cfg.train.batch_size,
        d.image_size,
        d.in_chans,
        train=True,
        augment=d.augment,
        seed=cfg.train.seed,
        shuffle_buffer=d.shuffle_buffer,
        multilabel=task.vector_target,
        views=manifest.views,
        label_key=manifest.label_key,
        classes=task.classes,
        repeat=repeat,
        # RandAugment follows the warp in the worker, so it keeps an auto run's warp there.
        augment_on_device=d.augment_on == "device"
        or (d.augment_on == "auto" and device.type == "cuda" and not d.randaugment),
        randaugment=d.randaugment,
        mean=tuple(d.mean),
    )


def eval_spec(
    cfg: Config,
    manifest: Manifest,
    task: Task,
    split: str,
    batch_size: int | None = None,
    with_masks: bool = False,
) -> StreamSpec:
    d = cfg.data
    return StreamSpec(
        tuple(split_shards(d.shards, manifest, split)),
        batch_size or cfg.eval.batch_size,
        d.image_size,
        d.in_chans,
        seed=cfg.train.seed,
        multilabel=task.vector_target,
        views=manifest.views,
        label_key=manifest.label_key,
        classes=task.classes,
        with_masks=with_masks,
        patient_key=manifest.patient_key,
    )
