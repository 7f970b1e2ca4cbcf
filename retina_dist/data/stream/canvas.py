"""The batch buffer when the augmentation runs on the device: a batch's decoded frames top-left on
one canvas, zeros beyond each frame (the device warp then sees the black border that OpenCV's
constant border gives the worker's warp).

A frame as wide as the canvas is decoded straight into its slot (``codec.decode(out=...)``): the
rows of a full-width frame are contiguous, so the copy of every frame into the buffer, ~11% of a
worker's time in ``bench data``, is gone. A narrower frame is decoded on its own and copied in. A
frame larger than the canvas grows it (the frames placed so far move over); a worker starts each
batch at the largest size it has needed, so a dataset's canvas settles after a few batches."""

from __future__ import annotations

import numpy as np
import torch

from retina_dist.data.stream.buffers import BufferPool, Lease


class Canvas:
    def __init__(self, pool: BufferPool, lead: tuple[int, ...], chans: int, size: tuple[int, int]) -> None:
        self.pool, self.lead, self.chans = pool, lead, chans  # lead: (batch, views)
        # Taken from the pool at the first frame, not before: a buffer held by a batch not yet begun
        # is one more in flight than the pool keeps.
        self.size = size
        self.tensor: torch.Tensor | None = None
        self.array: np.ndarray = np.empty((0,), np.uint8)  # the tensor's numpy view, once taken
        self.lease: Lease | None = None
        self.frames: dict[tuple[int, int], tuple[int, int]] = {}  # (sample, view) -> (h, w) placed

    def slot(self, i: int, v: int, h: int, w: int) -> np.ndarray | None:
        """Where frame ``v`` of sample ``i``, ``h`` x ``w``, can be decoded in place; None when it is
        narrower than the canvas (its rows would not be contiguous): decode it and ``put`` it."""
        self._fit(h, w)
        if w != self.size[1]:
            return None
        self.frames[(i, v)] = (h, w)
        return self.array[i, v, :h]

    def put(self, i: int, v: int, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        self._fit(h, w)
        self.array[i, v, :h, :w] = frame
        self.frames[(i, v)] = (h, w)

    def forget(self, i: int) -> None:
        """Sample ``i`` could not be read: its slot goes to the next sample."""
        self.frames = {k: hw for k, hw in self.frames.items() if k[0] != i}

    def finish(self, n: int) -> torch.Tensor:
        """The first ``n`` samples, zeros beyond each frame (the buffer is reused: stale pixels)."""
        for (i, v), (h, w) in self.frames.items():
            if i < n:
                self.array[i, v, h:] = 0
                self.array[i, v, :h, w:] = 0
        assert self.tensor is not None, "finish() before any frame"
        return self.tensor[:n]

    def _fit(self, h: int, w: int) -> None:
        if self.tensor is None or h > self.size[0] or w > self.size[1]:
            self._grow(max(h, self.size[0]), max(w, self.size[1]))

    def _grow(self, h: int, w: int) -> None:
        tensor, lease = self.pool.get(self.lead + (h, w) + ((self.chans,) if self.chans > 1 else ()))
        array = tensor.numpy()
        for (i, v), (fh, fw) in self.frames.items():  # none when the first frame takes the buffer
            array[i, v, :fh, :fw] = self.array[i, v, :fh, :fw]
        if self.lease is not None:
            self.lease.release()
        self.tensor, self.lease, self.array, self.size = tensor, lease, array, (h, w)
