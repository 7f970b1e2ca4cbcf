"""The order of samples: a pure function of (seed, epoch, rank, loader worker, batches skipped).

Training: shards are shuffled per epoch and dealt to the global loader workers (rank x worker); each
worker cycles its shards through a seeded shuffle buffer and emits a fixed number of batches, so every
rank gets exactly ``batches_per_rank`` batches whatever the shard sizes (no DDP hang on uneven data).
The DataLoader takes batches from its workers in turn, so batch ``b`` always comes from logical worker
``b % W``; a resumed epoch rotates the workers and skips the consumed samples before decoding them.

Evaluation: shards are dealt round-robin to (rank, worker), each read once, in order, never padded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from retina_dist.data.sample_format import field, label_of
from retina_dist.data.stream.shard_reader import read_samples
from retina_dist.data.stream.spec import StreamSpec


@dataclass(frozen=True)
class TrainPlan:
    """What one loader worker produces in a training epoch."""

    worker: int  # global logical worker (rank x workers + logical), the one whose samples it reads
    workers: int  # global logical workers in all
    batches: range  # the epoch's global batch indices this worker produces
    first: int  # position in ``batches`` of the first one still to produce (a resume skips the rest)

    @property
    def skipped_samples(self) -> int:
        return self.first

    def todo(self) -> range:
        return range(self.first, len(self.batches))


def train_plan(rank: int, world: int, worker: int, n_workers: int, num_batches: int, skip: int) -> TrainPlan:
    logical = (worker + skip) % n_workers
    mine = range(logical, num_batches, n_workers)  # global batch indices of this logical worker
    first = next((j for j, b in enumerate(mine) if b >= skip), len(mine))
    return TrainPlan(rank * n_workers + logical, world * n_workers, mine, first)


def train_samples(spec: StreamSpec, epoch: int, gw: int, total: int) -> Iterator[dict[str, Any]]:
    """Endless raw samples for global worker ``gw``: its shards (or every total-th sample when
    there are fewer shards than workers), reshuffled on every pass."""
    paths = [p for p, _ in spec.shards]
    order = np.random.default_rng([spec.seed, epoch]).permutation(len(paths))
    by_shard = len(paths) >= total
    mine = [paths[i] for i in order[gw::total]] if by_shard else [paths[i] for i in order]
    cycle = 0
    while True:
        rng = np.random.default_rng([spec.seed, epoch, gw, cycle])
        stream = read_samples([mine[i] for i in rng.permutation(len(mine))])
        if not by_shard:
            stream = (s for i, s in enumerate(stream) if i % total == gw)
        if spec.repeat:
            stream = _repeated(stream, spec, np.random.default_rng([spec.seed, epoch, gw, cycle, 1]))
        yield from _shuffled(stream, spec.shuffle_buffer, rng)
        cycle += 1


def eval_samples(spec: StreamSpec, rank: int, world: int, worker: int, n_workers: int) -> Iterator[dict]:
    """Every raw sample of this (rank, worker)'s shards, once, in order."""
    gw, total = rank * n_workers + worker, world * n_workers
    return read_samples([p for p, _ in spec.shards][gw::total])


def batch_rng(spec: StreamSpec, epoch: int, rank: int, j: int) -> np.random.Generator:
    """The generator of logical batch ``j``'s augmentation draws: seeded by its place in the epoch,
    so a resumed epoch augments exactly as before."""
    return np.random.default_rng([spec.seed, epoch, rank, j])


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
) -> tuple[float, ...]:
    """Repeat-factor sampling (Gupta et al., LVIS 2019) for a stream with no random access: class c
    is repeated r_c = max(1, sqrt(t / f_c)) times on average, f_c its share of the split and t the
    threshold (0: the largest share, so the commonest class is never repeated)."""
    freq = np.array([histogram.get(c, 0) / max(count, 1) for c in classes])
    t = thresh or float(freq.max())
    return tuple(float(max(1.0, np.sqrt(t / f))) if f > 0 else 1.0 for f in freq)


def _repeated(samples: Iterator[dict], spec: StreamSpec, rng: np.random.Generator) -> Iterator[dict]:
    """Each raw sample floor(r) times plus once more with probability frac(r); r from its label (the
    largest factor of its positive classes when multi-label). The label is read from the sample's
    small JSON, never by decoding the image."""
    factors = spec.repeat
    for s in samples:
        try:
            label = _label(s, spec)
        except (KeyError, ValueError):
            yield s  # the assembler skips and counts it
            continue
        if isinstance(label, list):
            r = max([factors[i] for i, v in enumerate(label) if v] or [1.0])
        else:
            r = factors[label]
        n = int(r) + int(rng.random() < r - int(r))
        for _ in range(n):
            yield s


def _label(s: dict[str, Any], spec: StreamSpec) -> int | list[float]:
    return label_of(field(s, spec.label_key), spec.classes, spec.multilabel)
