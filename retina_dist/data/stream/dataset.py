"""The stream as a torch IterableDataset: each loader worker follows its plan (``order``) and fills
batches with its pipeline's assembler (``assemble``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from retina_dist.data.stream import order
from retina_dist.data.stream.assemble import Assembler, assembler
from retina_dist.data.stream.buffers import BufferPool
from retina_dist.data.stream.spec import StreamSpec


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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # This process's own pool (a worker's, after the fork).
        asm = assembler(self.spec, BufferPool(), self.epoch, self.rank)
        if self.spec.train:
            yield from self._train(asm, worker, n_workers)
        else:
            yield from self._eval(asm, worker, n_workers)

    def _train(self, asm: Assembler, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        size = self.spec.batch_size
        plan = order.train_plan(self.rank, self.world, worker, n_workers, self.num_batches, self.skip)
        raw = order.train_samples(self.spec, self.epoch, plan.worker, plan.workers)
        for _ in range(plan.first * size):  # consumed before a resume: skipped undecoded
            next(raw)
        for j in plan.todo():
            asm.start(j)
            while asm.n < size:
                asm.add(next(raw))
            yield asm.collate()

    def _eval(self, asm: Assembler, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        asm.start()
        for raw in order.eval_samples(self.spec, self.rank, self.world, worker, n_workers):
            if asm.add(raw) and asm.n == self.spec.batch_size:
                yield asm.collate()
                asm.start()
        if asm.n:
            yield asm.collate()
