"""Batch assemblers, one per pipeline. Each owns its buffer type and its colour order, takes raw
samples (decoding them, skipping and counting the unreadable) and hands out collated batches:

- ``ResizeAssembler``: evaluation (and training without augmentation): the evaluation resize,
  RGB, written into a pooled shared-memory buffer.
- ``WarpAssembler``: the fused training warp in the loader worker (BGR decoded four channels wide,
  the swap folded into the colour matrix), written into a pooled buffer.
- ``CanvasAssembler``: frames decoded onto a canvas with each image's geometry and colour matrices;
  the accelerator warps them (``augment_device``).

A batch is a dict: ``key``, ``image`` (uint8, B x C x H x W or B x V x C x H x W, a channels-last
view), ``target``, ``lease`` (``buffers.release`` once the pixels are on the device), and ``mask``
or ``augment`` where the pipeline has them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from retina_dist.data.codec import CorruptImage, decode, jpeg_shape
from retina_dist.data.preprocess import prescale, view_unchanged
from retina_dist.data.preprocess import view as prepare_view
from retina_dist.data.sample_format import field, image_member, label_of
from retina_dist.data.stream.augment import FusedTrainAugment, build_transform
from retina_dist.data.stream.buffers import BufferPool, Lease
from retina_dist.data.stream.canvas import Canvas
from retina_dist.data.stream.recipe_augment import RandAugmentStep
from retina_dist.data.stream.spec import StreamSpec

log = logging.getLogger(__name__)

Loaded = tuple[dict[str, Any], list[np.ndarray], np.ndarray | None]  # meta, views, mask


class Assembler:
    """What every pipeline shares: decoding a raw sample's views and mask, counting the skipped,
    the batch's labels and keys, and the collated dict."""

    bgr = False  # decode colour frames in OpenCV's BGR order
    pad = False  # ... and four channels wide (RGBX)

    def __init__(self, spec: StreamSpec, pool: BufferPool) -> None:
        self.spec, self.pool = spec, pool
        self.corrupt = 0
        self._reported = 0  # of ``corrupt``, those already shipped with a batch
        self.meta: list[dict[str, Any]] = []
        self.masks: list[Any] | None = None
        self.lease: Lease | None = None

    @property
    def n(self) -> int:
        return len(self.meta)

    def start(self, j: int = 0) -> None:
        """Begin a new batch (``j``: its logical index in the epoch, which seeds its draws)."""
        self.meta = []
        self.masks = [] if self.spec.with_masks else None

    def add(self, raw: dict[str, Any]) -> bool:
        """Decode ``raw`` into the batch's next slot; False (and counted) when it cannot be read."""
        loaded = self._load(raw)
        if loaded is None:
            return False
        meta, images, mask = loaded
        mask_out = self._place(images, mask)
        self.meta.append(meta)
        if self.masks is not None:
            self.masks.append(mask_out)
        return True

    def collate(self) -> dict[str, Any]:
        images = self._images()
        # B x V x H x W x C -> B x V x C x H x W as a view: channels-last strides, no copy here; the
        # device normalisation makes the layout the model asks for.
        images = images.unsqueeze(2) if images.ndim == 4 else images.permute(0, 1, 4, 2, 3)
        if len(self.spec.views) == 1:
            images = images[:, 0]
        dtype = torch.float32 if self.spec.multilabel else torch.long
        out: dict[str, Any] = {
            "key": [m["key"] for m in self.meta],
            "image": images,  # uint8; normalised on the device
            "target": torch.tensor([m["label"] for m in self.meta], dtype=dtype),
            "lease": self.lease,  # buffers.release(batch) once the pixels are on the device
            "skipped": self.corrupt - self._reported,  # undecodable samples passed over since the last
        }
        self._reported = self.corrupt
        if self.masks is not None and any(m is not None for m in self.masks):
            # A sample without a lesion mask (most datasets have none) gets an empty one: not scored.
            size = (self.spec.image_size, self.spec.image_size)
            out["mask"] = torch.from_numpy(
                np.stack([np.zeros(size, np.uint8) if m is None else m for m in self.masks])
            )
        if self.spec.patient_key:
            out["patient"] = [m["patient"] for m in self.meta]
        out.update(self._extra())
        return out

    # -- per pipeline ---------------------------------------------------------------------------
    def _place(self, images: list[np.ndarray], mask: np.ndarray | None) -> np.ndarray | None:
        raise NotImplementedError

    def _images(self) -> torch.Tensor:
        raise NotImplementedError

    def _extra(self) -> dict[str, Any]:
        return {}

    def _view(self, v: int, data: bytes, label: str) -> np.ndarray:
        image = decode(data, label, bgr=self.bgr, pad=self.pad)
        return prepare_view(image, self.spec.in_chans, self.spec.image_size)

    def _forget(self) -> None:
        """The sample being loaded failed: give its slot back."""

    # -- shared ---------------------------------------------------------------------------------
    def _load(self, raw: dict[str, Any]) -> Loaded | None:
        spec, key = self.spec, raw["__key__"]
        try:
            parsed = json.loads(raw["json"]) if "json" in raw else None
            value = field(raw, spec.label_key, parsed)
            meta = {"key": key, "label": label_of(value, spec.classes, spec.multilabel)}
            if spec.patient_key:
                try:
                    meta["patient"] = str(field(raw, spec.patient_key, parsed))
                except KeyError:  # a sample without one is its own patient
                    meta["patient"] = key
            images = []
            single = len(spec.views) == 1
            for v, view in enumerate(spec.views):
                name = image_member(raw, view, single)
                images.append(self._view(v, raw[name], f"{raw['__url__']}:{key}.{name}"))
            mask = (
                prescale(decode(raw["mask.png"], f"{key}.mask.png"), spec.image_size, nearest=True)
                if spec.with_masks and "mask.png" in raw
                else None
            )
        except (CorruptImage, StopIteration, KeyError, ValueError) as err:
            self._forget()
            self.corrupt += 1
            log.warning("skipping sample %s (%s); %d skipped so far in this worker", key, err, self.corrupt)
            return None
        return meta, images, mask

    def _pooled(self) -> np.ndarray:
        """A batch buffer at the output size, from the pool (its numpy view)."""
        spec = self.spec
        shape = (spec.batch_size, len(spec.views), spec.image_size, spec.image_size)
        self.tensor, self.lease = self.pool.get(shape + ((spec.in_chans,) if spec.in_chans > 1 else ()))
        return self.tensor.numpy()


class ResizeAssembler(Assembler):
    def __init__(self, spec: StreamSpec, pool: BufferPool) -> None:
        super().__init__(spec, pool)
        self.transform = build_transform(spec.image_size, False, False, spec.in_chans == 3)

    def start(self, j: int = 0) -> None:
        super().start(j)
        self.slots = self._pooled()

    def _place(self, images: list[np.ndarray], mask: np.ndarray | None) -> np.ndarray | None:
        mask_out = None
        for v, image in enumerate(images):
            out = self.transform(image=image, **({} if mask is None else {"mask": mask}))
            self.slots[self.n, v][...] = out["image"]
            mask_out = out.get("mask")
        return mask_out

    def _images(self) -> torch.Tensor:
        return self.tensor[: self.n]


class WarpAssembler(Assembler):
    # Colour frames stay in OpenCV's BGR: the colour matrix swaps channels on the small output anyway;
    # four channels wide, the warp is ~1.7x faster than on three.
    def __init__(self, spec: StreamSpec, pool: BufferPool, epoch: int, rank: int) -> None:
        super().__init__(spec, pool)
        self.augment = FusedTrainAugment(spec.image_size, spec.in_chans == 3)
        self.bgr = self.pad = spec.in_chans == 3
        self.epoch, self.rank = epoch, rank
        self.randaugment = (
            RandAugmentStep(spec.randaugment, spec.image_size, spec.in_chans, list(spec.mean))
            if spec.randaugment
            else None
        )

    def start(self, j: int = 0) -> None:
        from retina_dist.data.stream.order import batch_rng

        super().start(j)
        self.slots = self._pooled()
        rng = batch_rng(self.spec, self.epoch, self.rank, j)
        self.draws = self.augment.draw(rng, self.spec.batch_size, len(self.spec.views))
        # Drawn after the warp's uniforms, so the warp of a batch is the same with or without these.
        self.seeds = rng.integers(0, 2**31, (self.spec.batch_size, len(self.spec.views)))
        self.erase_seed = int(rng.integers(0, 2**31))

    def _place(self, images: list[np.ndarray], mask: np.ndarray | None) -> np.ndarray | None:
        i, mask_out = self.n, None
        for v, image in enumerate(images):
            _, mask_out = self.augment(image, self.draws[i, v], mask, dst=self.slots[i, v], bgr=self.bgr)
            if self.randaugment is not None:
                self.randaugment(self.slots[i, v], int(self.seeds[i, v]))
        return mask_out

    def _images(self) -> torch.Tensor:
        return self.tensor[: self.n]

    def _extra(self) -> dict[str, Any]:
        return {"seed": self.erase_seed}  # the device's random erasing of this batch


class CanvasAssembler(Assembler):
    def __init__(self, spec: StreamSpec, pool: BufferPool, epoch: int, rank: int) -> None:
        super().__init__(spec, pool)
        self.augment = FusedTrainAugment(spec.image_size, spec.in_chans == 3)
        self.bgr = spec.in_chans == 3
        self.epoch, self.rank = epoch, rank
        self.canvas_size = (0, 0)  # the largest canvas this worker has needed

    def start(self, j: int = 0) -> None:
        from retina_dist.data.stream.order import batch_rng

        super().start(j)
        spec, c, views = self.spec, self.spec.in_chans, len(self.spec.views)
        self.geometry = np.zeros((spec.batch_size, views, 2, 3), np.float32)
        self.colour = np.zeros((spec.batch_size, views, c, c + 1), np.float32)
        self.canvas = Canvas(self.pool, (spec.batch_size, views), c, self.canvas_size)
        rng = batch_rng(spec, self.epoch, self.rank, j)
        self.draws = self.augment.draw(rng, spec.batch_size, views)
        rng.integers(0, 2**31, (spec.batch_size, views))  # the worker path's RandAugment seeds
        self.erase_seed = int(rng.integers(0, 2**31))

    def _view(self, v: int, data: bytes, label: str) -> np.ndarray:
        """A view decoded straight into its canvas slot when nothing else is to be done to it (the
        model's channels, no prescale), else decoded, prepared and copied in."""
        spec, i = self.spec, self.n
        shape = jpeg_shape(data)
        if shape is not None and view_unchanged(shape, spec.in_chans, spec.image_size):
            if (dst := self.canvas.slot(i, v, shape[0], shape[1])) is not None:
                return decode(data, label, bgr=self.bgr, out=dst)
        image = prepare_view(decode(data, label, bgr=self.bgr), spec.in_chans, spec.image_size)
        self.canvas.put(i, v, image)
        return image

    def _forget(self) -> None:
        self.canvas.forget(self.n)

    def _place(self, images: list[np.ndarray], mask: np.ndarray | None) -> np.ndarray | None:
        i = self.n
        for v, image in enumerate(images):
            u, rgb = self.draws[i, v], image.ndim == 3
            self.geometry[i, v] = self.augment.geometry(image.shape[0], image.shape[1], u)
            self.colour[i, v] = self.augment.colour_map(u, 3 if rgb else 1, bgr=self.bgr and rgb)
        return None

    def _images(self) -> torch.Tensor:
        images, self.lease = self.canvas.finish(self.n), self.canvas.lease
        self.canvas_size = self.canvas.size
        return images

    def _extra(self) -> dict[str, Any]:
        return {
            "augment": {
                "geometry": torch.from_numpy(self.geometry[: self.n]),
                "colour": torch.from_numpy(self.colour[: self.n]),
                "size": self.spec.image_size,
            },
            "seed": self.erase_seed,
        }


def assembler(spec: StreamSpec, pool: BufferPool, epoch: int = 0, rank: int = 0) -> Assembler:
    if spec.pipeline == "canvas":
        return CanvasAssembler(spec, pool, epoch, rank)
    if spec.pipeline == "warp":
        return WarpAssembler(spec, pool, epoch, rank)
    return ResizeAssembler(spec, pool)
