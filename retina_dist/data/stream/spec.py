"""What a stream reads and how: the one description every pipeline, the loader and the engine share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamSpec:
    shards: tuple[tuple[str, int], ...]  # (path, samples)
    batch_size: int
    image_size: int
    in_chans: int = 3
    train: bool = False
    augment: bool = True
    seed: int = 0
    shuffle_buffer: int = 256
    with_masks: bool = False
    multilabel: bool = False
    views: tuple[str, ...] = ("img",)  # images per sample (manifest "views"): ("left", "right") for ODIR
    repeat: tuple[float, ...] = ()  # per-class repeat factors for class-balanced training (empty: off)
    # Training augmentation on the accelerator (``augment_device.apply``): workers ship decoded frames
    # on a canvas with each image's geometry and colour matrices instead of warped pixels.
    augment_on_device: bool = False
    label_key: str = "json:label"  # where the label is (manifest ``label_key``): json:FIELD or an extension
    randaugment: str = ""  # timm RandAugment string applied after the worker warp (empty: off)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # RandAugment's fill colour
    classes: tuple[str, ...] = ()  # the task's classes: maps class names to indices (empty: labels as stored)
    patient_key: str = ""  # where a sample's patient is (manifest ``patient_key``); empty: not read

    @property
    def count(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def pipeline(self) -> str:
        """``resize`` (evaluation, or training without augmentation), ``warp`` (the training
        augmentation in the loader worker) or ``canvas`` (decoded frames for the device's warp)."""
        if not (self.train and self.augment):
            return "resize"
        return "canvas" if self.augment_on_device and not self.with_masks else "warp"


def batches_per_rank(spec: StreamSpec, world_size: int, accum_steps: int = 1) -> int:
    """Full batches each rank runs per training epoch: equal on all ranks, a multiple of ``accum_steps``."""
    return spec.count // (world_size * spec.batch_size) // accum_steps * accum_steps
