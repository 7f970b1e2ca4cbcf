"""Moving a loader batch onto the device: uint8 travels through the loader (4x less copying than
float32) and is normalised on the device."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from retina_dist.data import augment_device


class Inputs:
    def __init__(
        self,
        mean: list[float],
        std: list[float],
        in_chans: int,
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        mean_t, std_t = torch.tensor(mean[:in_chans]), torch.tensor(std[:in_chans])
        if in_chans == 1 and len(mean) == 3:
            mean_t, std_t = torch.tensor([sum(mean) / 3]), torch.tensor([sum(std) / 3])
        self.scale = (1 / (255.0 * std_t)).view(1, -1, 1, 1).to(device)
        self.shift = (-mean_t / std_t).view(1, -1, 1, 1).to(device)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        target = batch["target"].to(self.device, non_blocking=True)
        if "augment" in batch:  # frames on a canvas: the training augmentation happens here
            pixels = augment_device.apply(batch["image"].to(self.device, non_blocking=True), batch["augment"])
            return self._normalise(pixels), target
        return self.images(batch["image"]), target

    def images(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 B x C x H x W (or B x V x C x H x W for multi-view samples) -> normalised float."""
        return self._normalise(image.to(self.device, non_blocking=True).float())

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels * self.scale + self.shift
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x.contiguous()


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
