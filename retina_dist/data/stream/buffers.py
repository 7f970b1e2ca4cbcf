"""Batch buffers that a loader worker hands out and takes back.

A batch's pixels are written once, in place, into a buffer the main process maps (shared memory in
a loader worker, as torch's own collate does). Filling a *fresh* shared-memory buffer costs far
more than the write itself, because its pages are faulted in one at a time: 374 us against 42 us
for a 0.6 MB frame on the 2-core VM. So buffers are reused, but only once the consumer has said it
is done with one (``release(batch)``, after its copy to the device). A batch that someone keeps
is never overwritten, and a consumer that never releases simply gets fresh buffers every time."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import get_worker_info

# The byte after each buffer's pixels: set by the worker when it sends the buffer, cleared by the
# consumer's release. Plain stores to shared memory: the consumer clears it only after its reads.
IN_FLIGHT, RETURNED = 1, 0


class Lease:
    """Travels with a batch (a plain object, so pin-memory passes it through untouched)."""

    def __init__(self, flag: torch.Tensor) -> None:
        self.flag = flag

    def release(self) -> None:
        self.flag.fill_(RETURNED)


class BufferPool:
    """uint8 buffers, each reused (for any batch that fits in it) once its lease is released. At
    most ``keep`` are kept, what a loader has in flight at once (its 4 prefetched batches, the one
    the consumer holds, the one being filled, one more measured in passing), so the pool holds no
    more than was in flight anyway: with 6, a worker made 56 fresh buffers in 105 batches, with 8
    it made 7. A batch larger than every free buffer gets a fresh one, which takes the place of a
    smaller free one (canvases of frames vary in size from batch to batch)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.kept: list[torch.Tensor] = []  # each: capacity bytes, then the flag byte
        self.allocated = 0  # fresh buffers made (reuse is visible in tests)

    def get(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, Lease]:
        n = math.prod(shape)
        free = [r for r in self.kept if int(r[-1]) == RETURNED]
        raw = min((r for r in free if r.numel() > n), key=torch.Tensor.numel, default=None)
        if raw is None:
            raw = _allocate(n + 1)
            self.allocated += 1
            if len(self.kept) < self.keep:
                self.kept.append(raw)
            elif free:  # make room: forget the smallest free buffer
                smallest = min(free, key=torch.Tensor.numel)
                # By identity: list.remove would compare tensors with ==, elementwise.
                self.kept = [r for r in self.kept if r is not smallest] + [raw]
        raw[-1] = IN_FLIGHT
        return raw[:n].view(shape), Lease(raw[-1:])


def _allocate(n: int) -> torch.Tensor:
    """In a loader worker, shared memory (the batch then crosses to the main process without the
    copy that pickling an ordinary tensor makes); in the main process, ordinary memory."""
    if get_worker_info() is None:
        return torch.empty(n, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))


def release(batch: dict[str, Any]) -> None:
    """The consumer is done with ``batch``'s pixels (they have been copied to the device): the
    worker may refill its buffer. Never call it while anything still reads ``batch["image"]``."""
    lease = batch.get("lease")
    if lease is not None:
        lease.release()
