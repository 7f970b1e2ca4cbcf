"""From loader batches to model inputs on the device (timm's PrefetchLoader pattern): the pixels go
to the device as uint8 (4x less to copy than float32), the device augmentation runs there when the
pipeline shipped a canvas, the batch is normalised, and its buffer is handed back to the loader
worker. The engine sees only ``(x, y, keys)``: never a lease or an augmentation plan."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from retina_dist.data.stream import augment_device
from retina_dist.data.stream.buffers import release
from retina_dist.data.stream.recipe_augment import BatchEraser


class DeviceInputs:
    """uint8 batches -> normalised float on ``device`` (with the device augmentation when asked)."""

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        in_chans: int,
        device: torch.device,
        channels_last: bool = False,
        erase: float = 0.0,
    ) -> None:
        mean_t, std_t = torch.tensor(mean[:in_chans]), torch.tensor(std[:in_chans])
        if in_chans == 1 and len(mean) == 3:
            mean_t, std_t = torch.tensor([sum(mean) / 3]), torch.tensor([sum(std) / 3])
        self.scale = (1 / (255.0 * std_t)).view(1, -1, 1, 1).to(device)
        self.shift = (-mean_t / std_t).view(1, -1, 1, 1).to(device)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Random erasing of training batches (those that carry a seed); evaluation batches have none.
        self.eraser = BatchEraser(erase, device) if erase > 0 else None

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        target = batch["target"].to(self.device, non_blocking=True)
        if "augment" in batch:  # frames on a canvas: the training augmentation happens here
            pixels = augment_device.apply(batch["image"].to(self.device, non_blocking=True), batch["augment"])
            x = self._normalise(pixels)
        else:
            x = self.images(batch["image"])
        if self.eraser is not None and "seed" in batch:
            x = self.eraser(x, int(batch["seed"]))
        return x, target

    def images(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 B x C x H x W (or B x V x C x H x W for multi-view samples) -> normalised float."""
        return self._normalise(image.to(self.device, non_blocking=True).float())

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels * self.scale + self.shift
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x.contiguous()


class DeviceFeeder:
    """Iterates ``(x, y, keys)`` on the device over a loader's batches, releasing each buffer once
    its pixels are there (the worker may then refill it). Counts the samples delivered and those the
    workers could not decode (``seen``, ``skipped``), and keeps the patients of the batch last yielded
    when the stream reads them (``patients``)."""

    def __init__(self, batches: Iterable[dict[str, Any]], inputs: DeviceInputs) -> None:
        self.batches, self.inputs = batches, inputs
        self.seen = self.skipped = 0
        self.patients: list[str] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for batch in self.batches:
            x, y = self.inputs(batch)
            release(batch)
            self.seen += len(batch["key"])
            self.skipped += int(batch.get("skipped", 0))
            self.patients = batch.get("patient", [])
            yield x, y, batch["key"]
