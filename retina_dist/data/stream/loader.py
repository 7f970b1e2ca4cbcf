"""Loader workers: the DataLoader over a ``ShardStream``, each worker's setup, and the exit hook that
lets a program whose loader outlived an error exit with that error."""

from __future__ import annotations

import atexit
import multiprocessing.util
import signal

import torch
from torch.utils.data import DataLoader

from retina_dist.data import codec
from retina_dist.data.stream.allocator import keep_freed_memory
from retina_dist.data.stream.dataset import ShardStream
from retina_dist.data.stream.spec import StreamSpec

_exit_hook_registered = False


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


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        # atexit runs last-registered first: registered now, after multiprocessing.util's handler
        # (imported with multiprocessing, above), it runs before it.
        atexit.register(_end_workers)
        _exit_hook_registered = True


def make_loader(
    spec: StreamSpec,
    rank: int,
    world_size: int,
    workers: int,
    epoch: int = 0,
    num_batches: int = 0,
    skip_batches: int = 0,
) -> DataLoader:
    # Before the fork, not in the worker: OpenCV's pool cannot be resized in a child forked from a
    # parent whose pool had started (setNumThreads there waits forever on threads the fork dropped).
    codec.single_threaded()
    if workers:
        _register_exit_hook()
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
