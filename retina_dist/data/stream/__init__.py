"""Shards -> device batches. ``spec`` says what to read; ``order`` decides which samples each loader
worker reads, as a pure function of (seed, epoch, rank, worker, skip); ``assemble`` turns them into
batches, one assembler per pipeline; ``loader`` runs that in DataLoader workers; ``feeder`` moves
batches to the device (augmenting there when asked) and hands back ``(x, y, keys)``."""

from retina_dist.data.stream.feeder import DeviceFeeder, DeviceInputs
from retina_dist.data.stream.loader import make_loader, worker_init
from retina_dist.data.stream.order import repeat_factors
from retina_dist.data.stream.spec import StreamSpec, batches_per_rank

__all__ = [
    "StreamSpec",
    "batches_per_rank",
    "make_loader",
    "worker_init",
    "repeat_factors",
    "DeviceFeeder",
    "DeviceInputs",
]
