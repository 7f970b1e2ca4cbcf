"""The foundation-model recipe's augmentations, through timm's own implementations, made
deterministic and resumable: RandAugment (``rand-m9-mstd0.5-inc1``, PIL ops on the training-size
image in the loader worker) and random erasing (per-pixel noise in the normalised batch, on the
device). timm draws from the global ``random`` / ``numpy.random`` / torch generators; each call here
runs them under a seed that comes from the batch's place in the epoch, then puts the caller's states
back, so a resumed epoch augments exactly as the uninterrupted one and nothing else's randomness
moves."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with python's, numpy's and torch's global generators seeded by ``seed`` (the
    device's too when it is CUDA), restoring all of them afterwards."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def parse_randaugment(config: str, image_size: int, in_chans: int, mean: list[float]) -> Any:
    """timm's RandAugment for ``config`` (e.g. ``rand-m9-mstd0.5-inc1``), with the hparams timm's
    ``create_transform`` gives it: translations relative to the image, the dataset mean as fill.
    ``ValueError`` naming the string when timm cannot read it."""
    from timm.data.auto_augment import rand_augment_transform

    fill = tuple(min(255, round(255 * m)) for m in mean[:3])
    hparams: dict[str, Any] = {
        "translate_const": int(image_size * 0.45),
        "img_mean": fill if in_chans == 3 else round(sum(fill) / len(fill)),
    }
    if "-mmax" not in config:
        # At the top level (10) timm's PosterizeIncreasing keeps 0 bits, which Pillow >= 11 refuses
        # mid-epoch; a ceiling a hair below it keeps every op's strength within 0.1% of timm's.
        hparams["magnitude_max"] = 9.99
    if not config.startswith("rand"):
        raise ValueError(f"{config!r} is not a RandAugment string (rand-m9-mstd0.5-inc1, rand-m7-n2, ...)")
    try:
        return rand_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError) as err:
        why = err or "unknown section"
        raise ValueError(f"timm cannot read the RandAugment string {config!r} ({why})") from None


class RandAugmentStep:
    """RandAugment applied in place to one training-size uint8 image (H x W x C or H x W) of the
    batch buffer, with the image's own seed."""

    def __init__(self, config: str, image_size: int, in_chans: int, mean: list[float]) -> None:
        self.transform = parse_randaugment(config, image_size, in_chans, mean)

    def __call__(self, slot: np.ndarray, seed: int) -> None:
        with seeded(seed):
            out = self.transform(Image.fromarray(slot))
        slot[...] = np.asarray(out)


class BatchEraser:
    """timm's ``RandomErasing`` (RETFound's ``--reprob p --remode pixel --recount 1``) on a normalised
    device batch, seeded by the batch; a dual-eye batch's eyes are erased independently."""

    def __init__(self, probability: float, device: torch.device) -> None:
        from timm.data.random_erasing import RandomErasing

        self.device = device
        self.erase = RandomErasing(probability, mode="pixel", max_count=1, device=str(device))

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        flat = x.flatten(0, 1) if x.ndim == 5 else x
        with seeded(seed, self.device):
            self.erase(flat)  # in place
        return x
