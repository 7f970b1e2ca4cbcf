"""Shards -> batches. The order of samples is a pure function of (seed, epoch, rank, loader worker).

Training: shards are shuffled per epoch and dealt to the global loader workers (rank x worker); each
worker cycles its shards through a seeded shuffle buffer and emits a fixed number of batches, so every
rank gets exactly ``batches_per_rank`` batches whatever the shard sizes (no DDP hang on uneven data).
Batching happens inside the worker, and the DataLoader takes batches from its workers in turn, so
batch ``b`` always comes from logical worker ``b % W``; a resumed epoch rotates the workers and skips
the consumed samples before decoding them.

Evaluation: shards are dealt round-robin to (rank, worker), each read once, in order, never padded.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing.util
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from retina_dist.data.allocator import keep_freed_memory
from retina_dist.data.augment import FusedTrainAugment, build_transform, prescale
from retina_dist.data.buffers import BufferPool, Lease
from retina_dist.data.canvas import Canvas
from retina_dist.data.codec import CorruptImage, decode, jpeg_shape
from retina_dist.data.preprocess import view as prepare_view
from retina_dist.data.preprocess import view_unchanged
from retina_dist.data.shard_reader import read_samples

log = logging.getLogger(__name__)


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

    @property
    def count(self) -> int:
        return sum(n for _, n in self.shards)


def batches_per_rank(spec: StreamSpec, world_size: int, accum_steps: int = 1) -> int:
    """Full batches each rank runs per training epoch: equal on all ranks, a multiple of ``accum_steps``."""
    return spec.count // (world_size * spec.batch_size) // accum_steps * accum_steps


def _shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A shuffle buffer over raw (undecoded) samples: cheap bytes, deterministic given ``rng``."""
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def repeat_factors(
    histogram: dict[str, int], count: int, classes: tuple[str, ...], thresh: float = 0.0
) -> tuple:
    """Repeat-factor sampling (Gupta et al., LVIS 2019) for a stream with no random access: class c
    is repeated r_c = max(1, sqrt(t / f_c)) times on average, f_c its share of the split and t the
    threshold (0: the largest share, so the commonest class is never repeated)."""
    freq = np.array([histogram.get(c, 0) / max(count, 1) for c in classes])
    t = thresh or float(freq.max())
    return tuple(float(max(1.0, np.sqrt(t / f))) if f > 0 else 1.0 for f in freq)


def _repeated(
    samples: Iterator[dict], factors: tuple[float, ...], rng: np.random.Generator
) -> Iterator[dict]:
    """Each raw sample floor(r) times plus once more with probability frac(r); r from its label (the
    largest factor of its positive classes when multi-label). The label is read from the sample's
    small JSON, never by decoding the image."""
    for s in samples:
        label = json.loads(s["json"])["label"]
        if isinstance(label, list):
            r = max([factors[i] for i, v in enumerate(label) if v] or [1.0])
        else:
            r = factors[label]
        n = int(r) + int(rng.random() < r - int(r))
        for _ in range(n):
            yield s


class ShardStream(IterableDataset):
    def __init__(
        self,
        spec: StreamSpec,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        num_batches: int = 0,
        skip_batches: int = 0,
    ) -> None:
        super().__init__()
        self.spec, self.rank, self.world, self.epoch = spec, rank, world_size, epoch
        self.num_batches, self.skip = num_batches, skip_batches
        colour = spec.in_chans == 3
        self.transform = build_transform(spec.image_size, False, False, colour)  # evaluation, no augmentation
        self.augment = FusedTrainAugment(spec.image_size, colour) if spec.train and spec.augment else None
        self.on_device = self.augment is not None and spec.augment_on_device and not spec.with_masks
        # Colour frames stay in OpenCV's BGR when the augmentation swaps channels on its output anyway.
        self.bgr = self.augment is not None and spec.in_chans == 3
        # ... and four channels wide for the worker's warp, ~1.7x faster on four than on three.
        self.pad = self.bgr and not self.on_device
        self.corrupt = 0
        self._canvas_size = (0, 0)  # the largest canvas this worker has needed (augmentation on device)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        self.pool = BufferPool()  # this process's own (a worker's, after the fork)
        if self.spec.train:
            yield from self._train(worker, n_workers)
        else:
            yield from self._eval(worker, n_workers)

    # -- training -------------------------------------------------------------------------------
    def _train(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        logical = (worker + self.skip) % n_workers
        mine = range(logical, self.num_batches, n_workers)  # global batch indices of this logical worker
        first = next((j for j, b in enumerate(mine) if b >= self.skip), len(mine))
        quota = len(mine) * spec.batch_size
        gw, total = self.rank * n_workers + logical, self.world * n_workers
        raw = self._train_samples(gw, total)
        for _ in range(first * spec.batch_size):  # consumed before a resume: skipped undecoded
            next(raw)
        taken = first * spec.batch_size
        j = first
        batch = self._new_batch()
        draws = self._draws(j)
        while taken < quota:
            sample = self._load(next(raw), batch)
            if sample is None:
                continue
            self._place(sample, batch, draws)
            taken += 1
            if batch.n == spec.batch_size:
                yield self._collate(batch)
                j += 1
                batch, draws = self._new_batch(), self._draws(j)

    def _draws(self, j: int) -> np.ndarray | None:
        """Augmentation draws of logical batch ``j``, by position in the batch (and view): seeded by
        the batch's place in the epoch, so a resumed epoch augments exactly as before."""
        if self.augment is None:
            return None
        rng = np.random.default_rng([self.spec.seed, self.epoch, self.rank, j])
        return self.augment.draw(rng, self.spec.batch_size, len(self.spec.views))

    def _train_samples(self, gw: int, total: int) -> Iterator[dict]:
        """Endless raw samples for global worker ``gw``: its shards (or every total-th sample when
        there are fewer shards than workers), reshuffled on every pass."""
        spec = self.spec
        paths = [p for p, _ in spec.shards]
        order = np.random.default_rng([spec.seed, self.epoch]).permutation(len(paths))
        by_shard = len(paths) >= total
        mine = [paths[i] for i in order[gw::total]] if by_shard else [paths[i] for i in order]
        cycle = 0
        while True:
            rng = np.random.default_rng([spec.seed, self.epoch, gw, cycle])
            stream = read_samples([mine[i] for i in rng.permutation(len(mine))])
            if not by_shard:
                stream = (s for i, s in enumerate(stream) if i % total == gw)
            if spec.repeat:
                stream = _repeated(
                    stream, spec.repeat, np.random.default_rng([spec.seed, self.epoch, gw, cycle, 1])
                )
            yield from _shuffled(stream, spec.shuffle_buffer, rng)
            cycle += 1

    # -- evaluation -----------------------------------------------------------------------------
    def _eval(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        gw, total = self.rank * n_workers + worker, self.world * n_workers
        paths = [p for p, _ in self.spec.shards][gw::total]
        batch = self._new_batch()
        for raw in read_samples(paths):
            sample = self._load(raw)
            if sample is None:
                continue
            self._place(sample, batch, None)
            if batch.n == self.spec.batch_size:
                yield self._collate(batch)
                batch = self._new_batch()
        if batch.n:
            yield self._collate(batch)

    # -- samples --------------------------------------------------------------------------------
    def _load(
        self, raw: dict[str, Any], batch: _Batch | None = None
    ) -> tuple[dict, list[np.ndarray], np.ndarray | None] | None:
        """Decoded views (BGR when the augmentation will swap channels on its small output) and
        mask, or None for a sample that cannot be read (skipped and counted). With the augmentation
        on the device the views land in ``batch``'s canvas, as its next sample."""
        key = raw["__key__"]
        canvas = batch.canvas if batch is not None else None
        slot = batch.n if batch is not None else 0
        try:
            meta = json.loads(raw["json"])
            images = []
            for v, view in enumerate(self.spec.views):
                name = next(k for k in raw if k.startswith(f"{view}."))
                label = f"{raw['__url__']}:{key}.{name}"
                if canvas is not None:
                    images.append(self._onto_canvas(canvas, slot, v, raw[name], label))
                    continue
                image = decode(raw[name], label, bgr=self.bgr, pad=self.pad)
                images.append(prepare_view(image, self.spec.in_chans, self.spec.image_size))
            mask = (
                prescale(decode(raw["mask.png"], f"{key}.mask.png"), self.spec.image_size, nearest=True)
                if self.spec.with_masks and "mask.png" in raw
                else None
            )
        except (CorruptImage, StopIteration, KeyError, ValueError) as err:
            if canvas is not None:
                canvas.forget(slot)
            self.corrupt += 1
            log.warning("skipping sample %s (%s); %d skipped so far in this worker", key, err, self.corrupt)
            return None
        return meta, images, mask

    def _onto_canvas(self, canvas: Canvas, i: int, v: int, data: bytes, label: str) -> np.ndarray:
        """A view decoded straight into its canvas slot when nothing else is to be done to it (the
        model's channels, no prescale), else decoded, prepared and copied in."""
        spec = self.spec
        shape = jpeg_shape(data)
        if shape is not None and view_unchanged(shape, spec.in_chans, spec.image_size):
            if (dst := canvas.slot(i, v, *shape[:2])) is not None:
                return decode(data, label, bgr=self.bgr, out=dst)
        image = prepare_view(decode(data, label, bgr=self.bgr), spec.in_chans, spec.image_size)
        canvas.put(i, v, image)
        return image

    def _place(self, sample: tuple, batch: _Batch, draws: np.ndarray | None) -> None:
        """Transform a loaded sample straight into the next slot of the batch buffer (or, with the
        augmentation on the device, where its frame already is, work out its matrices)."""
        meta, images, mask = sample
        i = batch.n
        if self.on_device:
            assert batch.geometry is not None and batch.colour is not None
            assert self.augment is not None and draws is not None
            for v, image in enumerate(images):
                u, rgb = draws[i, v], image.ndim == 3
                batch.geometry[i, v] = self.augment.geometry(image.shape[0], image.shape[1], u)
                batch.colour[i, v] = self.augment.colour_map(u, 3 if rgb else 1, bgr=self.bgr and rgb)
            batch.add(meta, None)
            return
        assert batch.images is not None
        for v, image in enumerate(images):
            slot = batch.images[i, v]
            if draws is not None:
                assert self.augment is not None
                _, mask_out = self.augment(image, draws[i, v], mask, dst=slot, bgr=self.bgr)
            else:
                assert self.transform is not None
                out = self.transform(image=image, **({} if mask is None else {"mask": mask}))
                slot[...] = out["image"]
                mask_out = out.get("mask")
        batch.add(meta, mask_out)

    def _new_batch(self) -> _Batch:
        spec = self.spec
        if not self.on_device:
            return _Batch(*self.pool.get(self._shape(spec.image_size, spec.image_size)), spec.with_masks)
        c = spec.in_chans
        views = len(spec.views)
        return _Batch(
            None,
            None,
            False,
            geometry=np.zeros((spec.batch_size, views, 2, 3), np.float32),
            colour=np.zeros((spec.batch_size, views, c, c + 1), np.float32),
            canvas=Canvas(self.pool, (spec.batch_size, views), c, self._canvas_size),
        )

    def _shape(self, h: int, w: int) -> tuple[int, ...]:
        spec = self.spec
        shape = (spec.batch_size, len(spec.views), h, w)
        return shape + ((spec.in_chans,) if spec.in_chans > 1 else ())

    def _collate(self, batch: _Batch) -> dict[str, Any]:
        if batch.canvas is not None:
            images, batch.lease = batch.canvas.finish(batch.n), batch.canvas.lease
            self._canvas_size = batch.canvas.size
        else:
            assert batch.tensor is not None
            images = batch.tensor[: batch.n]
        # B x V x H x W x C -> B x V x C x H x W as a view: channels-last strides, no copy here; the
        # device normalisation makes the layout the model asks for.
        images = images.unsqueeze(2) if images.ndim == 4 else images.permute(0, 1, 4, 2, 3)
        if len(self.spec.views) == 1:
            images = images[:, 0]
        dtype = torch.float32 if self.spec.multilabel else torch.long
        out = {
            "key": [m["key"] for m in batch.meta],
            "image": images,  # uint8; normalised on the device
            "target": torch.tensor([m["label"] for m in batch.meta], dtype=dtype),
            "lease": batch.lease,  # buffers.release(batch) once the pixels are on the device
        }
        if batch.masks is not None:
            out["mask"] = torch.from_numpy(np.stack(batch.masks))
        if batch.geometry is not None and batch.colour is not None:
            out["augment"] = {
                "geometry": torch.from_numpy(batch.geometry[: batch.n]),
                "colour": torch.from_numpy(batch.colour[: batch.n]),
                "size": self.spec.image_size,
            }
        return out


class _Batch:
    """A batch being filled: its pixel buffer (and a numpy view of it) or, with the augmentation on
    the device, its canvas of decoded frames and their matrices; labels; masks."""

    def __init__(
        self,
        tensor: torch.Tensor | None,
        lease: Lease | None,
        with_masks: bool,
        geometry: np.ndarray | None = None,
        colour: np.ndarray | None = None,
        canvas: Canvas | None = None,
    ) -> None:
        self.tensor, self.lease = tensor, lease
        self.images = tensor.numpy() if tensor is not None else None
        self.geometry, self.colour, self.canvas = geometry, colour, canvas
        self.meta: list[dict] = []
        self.masks: list[Any] | None = [] if with_masks else None

    @property
    def n(self) -> int:
        return len(self.meta)

    def add(self, meta: dict, mask: np.ndarray | None) -> None:
        self.meta.append(meta)
        if self.masks is not None:
            self.masks.append(mask)


def worker_init(worker_id: int) -> None:
    keep_freed_memory()
    # SLURM signals every process of a step (preemption: TERM then USR1). A worker killed by it makes
    # the main process raise before it can checkpoint; the main process decides when workers stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _end_workers() -> None:
    """At exit, kill the daemonic children (loader workers) still running. multiprocessing's own exit
    handler ends them with SIGTERM, which ours ignore (above), then joins them: a program whose
    loader outlived it (an uncaught exception keeps its frames, and so its iterators, alive) would
    wait forever instead of exiting with its error."""
    # torch's SIGCHLD handler would report each as a failed worker, on top of the real error.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# Registered after multiprocessing.util's handler (imported above), so run before it.
atexit.register(_end_workers)


def make_loader(
    spec: StreamSpec,
    rank: int,
    world_size: int,
    workers: int,
    epoch: int = 0,
    num_batches: int = 0,
    skip_batches: int = 0,
) -> DataLoader:
    ds = ShardStream(spec, rank, world_size, epoch, num_batches, skip_batches)
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=worker_init if workers else None,
    )
