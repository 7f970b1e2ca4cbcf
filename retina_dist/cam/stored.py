"""The stored image behind an explanation: a sample's views and lesion mask as the pack holds them
(up to its ``max_side``, 512 px), not the network input, and the map from input pixels onto them.

Evaluation shrinks a stored view by an integer factor (``preprocess.prescale``, which drops the few
rows and columns past a multiple of it) and then resizes it to the square input, so a map at the input
size goes back by the inverse: resized onto the prescaled extent, zero on the dropped margin."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from retina_dist.data.codec import decode
from retina_dist.data.preprocess import prescale_factor
from retina_dist.data.sample_format import image_member
from retina_dist.data.stream.shard_reader import read_samples


@dataclass(frozen=True)
class Stored:
    views: list[np.ndarray]  # RGB H x W x 3 (grey images repeated), one per view
    mask: np.ndarray | None  # H x W bool at the first view's size, or None when the sample has none


class StoredReader:
    """The samples named by ``keys`` out of ``shards``, in one lazy pass: ``get`` reads on until it
    has what is asked, keeping any other wanted sample it passes (a rank's batches may come from its
    shards in another order than the files'). Only wanted samples are decoded."""

    def __init__(self, shards: Iterable[str], keys: set[str], views: tuple[str, ...]) -> None:
        self._samples: Iterator[dict[str, Any]] = read_samples(shards)
        self._wanted, self._views = keys, views
        self._found: dict[str, Stored] = {}

    def get(self, keys: Iterable[str]) -> dict[str, Stored]:
        keys = list(keys)
        while not all(k in self._found for k in keys):
            raw = next(self._samples, None)
            if raw is None:
                break
            if raw["__key__"] in self._wanted:
                self._found[raw["__key__"]] = _decode(raw, self._views)
        missing = [k for k in keys if k not in self._found]
        if missing:
            raise KeyError(f"samples {missing[:5]} are not in the split's shards")
        return {k: self._found.pop(k) for k in keys}


def _decode(raw: dict[str, Any], views: tuple[str, ...]) -> Stored:
    key, single = raw["__key__"], len(views) == 1
    images = []
    for view in views:
        name = image_member(raw, view, single)
        img = decode(raw[name], f"{raw['__url__']}:{key}.{name}")
        images.append(img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2))
    mask: np.ndarray | None = None
    if "mask.png" in raw:
        m = decode(raw["mask.png"], f"{raw['__url__']}:{key}.mask.png") > 0
        mask = np.asarray(m.any(-1) if m.ndim == 3 else m)
    return Stored(images, mask)


def to_stored(heat: np.ndarray, shape: tuple[int, int], image_size: int) -> np.ndarray:
    """A map over the ``image_size`` input -> the same map over the stored ``shape`` (H, W)."""
    h, w = shape
    k = max(prescale_factor(h, w, image_size), 1)
    h2, w2 = (h // k * k, w // k * k) if k >= 2 else (h, w)
    out = np.zeros((h, w), np.float32)
    out[:h2, :w2] = cv2.resize(heat.astype(np.float32), (w2, h2), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0, 1)
