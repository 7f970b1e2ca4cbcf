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

import json
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from retina_dist.data.augment import FusedTrainAugment, build_transform, prescale
from retina_dist.data.codec import CorruptImage, decode
from retina_dist.data.preprocess import view as prepare_view

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

    @property
    def count(self) -> int:
        return sum(n for _, n in self.shards)


def batches_per_rank(spec: StreamSpec, world_size: int, accum_steps: int = 1) -> int:
    """Full batches each rank runs per training epoch: equal on all ranks, a multiple of ``accum_steps``."""
    return spec.count // (world_size * spec.batch_size) // accum_steps * accum_steps


def _read(paths: list[str]) -> Iterator[dict[str, Any]]:
    yield from tarfile_samples([{"url": p} for p in paths])


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
        self.corrupt = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
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
        batch: list[dict] = []
        while taken < quota:
            sample = self._decode(next(raw), aug_seed=(j, len(batch)))
            if sample is None:
                continue
            batch.append(sample)
            taken += 1
            if len(batch) == spec.batch_size:
                yield self._collate(batch)
                batch, j = [], j + 1

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
            stream = _read([mine[i] for i in rng.permutation(len(mine))])
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
        batch: list[dict] = []
        for raw in _read(paths) if paths else ():
            sample = self._decode(raw)
            if sample is None:
                continue
            batch.append(sample)
            if len(batch) == self.spec.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    # -- samples --------------------------------------------------------------------------------
    def _decode(self, raw: dict[str, Any], aug_seed: tuple[int, int] | None = None) -> dict[str, Any] | None:
        key = raw["__key__"]
        try:
            meta = json.loads(raw["json"])
            images = []
            for view in self.spec.views:
                name = next(k for k in raw if k.startswith(f"{view}."))
                image = decode(raw[name], f"{raw['__url__']}:{key}.{name}")
                images.append(prepare_view(image, self.spec.in_chans, self.spec.image_size))
            mask = (
                prescale(decode(raw["mask.png"], f"{key}.mask.png"), self.spec.image_size, nearest=True)
                if self.spec.with_masks and "mask.png" in raw
                else None
            )
        except (CorruptImage, StopIteration, KeyError, ValueError) as err:
            self.corrupt += 1
            log.warning("skipping sample %s (%s); %d skipped so far in this worker", key, err, self.corrupt)
            return None
        out_images = []
        for v, image in enumerate(images):
            if self.augment is not None and aug_seed is not None:
                # Seeded per sample position (and view), so a resumed epoch augments exactly as before.
                seq = np.random.SeedSequence([self.spec.seed, self.epoch, self.rank, *aug_seed, v])
                image, mask_out = self.augment(image, np.random.default_rng(seq), mask)
            else:
                out = self.transform(image=image, **({} if mask is None else {"mask": mask}))
                image, mask_out = out["image"], out.get("mask")
            out_images.append(image)
        image = out_images[0] if len(out_images) == 1 else np.stack(out_images)
        return {"key": meta["key"], "label": meta["label"], "image": image, "mask": mask_out}

    def _collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        images = np.stack([s["image"] for s in batch])
        if len(self.spec.views) > 1:  # B x V x H x W (x C) -> B x V x C x H x W
            images = images[:, :, None] if images.ndim == 4 else images.transpose(0, 1, 4, 2, 3)
        else:
            images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        dtype = torch.float32 if self.spec.multilabel else torch.long
        out = {
            "key": [s["key"] for s in batch],
            "image": torch.from_numpy(np.ascontiguousarray(images)),  # uint8; normalised on the device
            "target": torch.tensor([s["label"] for s in batch], dtype=dtype),
        }
        if self.spec.with_masks:
            out["mask"] = torch.from_numpy(np.stack([s["mask"] for s in batch]))
        return out


def _ignore_stop_signals(worker_id: int) -> None:
    # SLURM signals every process of a step (preemption: TERM then USR1). A worker killed by it makes
    # the main process raise before it can checkpoint; the main process decides when workers stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


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
        worker_init_fn=_ignore_stop_signals if workers else None,
    )
