import os

import pytest
import torch

from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.stream import StreamSpec, batches_per_rank, make_loader
from retina_dist.data.stream.buffers import BufferPool, release


def test_pool_reuses_a_buffer_only_after_its_release():
    pool = BufferPool(keep=2)
    a, lease_a = pool.get((2, 3, 4))
    b, lease_b = pool.get((2, 3, 4))
    assert a.data_ptr() != b.data_ptr() and pool.allocated == 2
    lease_a.release()
    c, lease_c = pool.get((2, 3, 4))
    assert c.data_ptr() == a.data_ptr() and c.shape == (2, 3, 4) and pool.allocated == 2
    d, _ = pool.get((2, 3, 4))  # both kept buffers in flight: a fresh one, not kept (keep=2)
    assert d.data_ptr() not in (a.data_ptr(), b.data_ptr()) and pool.allocated == 3
    lease_b.release()
    e, lease_e = pool.get((5,))  # a smaller batch fits in a free larger buffer
    assert e.data_ptr() == b.data_ptr() and e.shape == (5,) and pool.allocated == 3
    lease_c.release()
    lease_e.release()
    f, lease_f = pool.get((40,))  # larger than every free buffer: fresh, kept in place of a smaller one
    assert (
        pool.allocated == 4 and len(pool.kept) == 2 and any(r.data_ptr() == f.data_ptr() for r in pool.kept)
    )
    lease_f.release()
    g, _ = pool.get((30,))
    assert g.data_ptr() == f.data_ptr() and pool.allocated == 4


def test_pool_evicts_the_smallest_free_buffer_wherever_it_is_kept():
    """The smallest free buffer is not always the first kept one (the CI run that hung: eviction
    compared tensors elementwise when it had to search the list)."""
    pool = BufferPool(keep=3)
    big, lease_big = pool.get((50,))
    small, lease_small = pool.get((10,))
    mid, lease_mid = pool.get((30,))
    for lease in (lease_big, lease_small, lease_mid):
        lease.release()
    fresh, _ = pool.get((60,))
    kept = {r.data_ptr() for r in pool.kept}
    assert pool.allocated == 4 and len(pool.kept) == 3
    assert kept == {big.data_ptr(), mid.data_ptr(), fresh.data_ptr()}
    again, _ = pool.get((40,))  # the one left free that fits: the 50-element buffer
    assert again.data_ptr() == big.data_ptr() and pool.allocated == 4


def _shm_id(image: torch.Tensor) -> int:
    """Which shared-memory object a batch arrived in (its inode), as the main process maps it."""
    handle = image.untyped_storage()._share_fd_cpu_()
    return os.fstat(handle[0]).st_ino


@pytest.mark.parametrize("on_device", [False, True], ids=["worker-augment", "device-canvas"])
def test_worker_refills_released_buffers_and_never_touches_kept_ones(shards, on_device):
    """A worker (a real loader process) refills a buffer only once the consumer released it: the
    released run travels in no more shared-memory objects than the pool keeps (what the loader has
    in flight) and delivers exactly the pixels of a run that keeps every batch, and the kept
    batches are still intact at the end."""
    spec = StreamSpec(
        tuple(split_shards(shards, load_manifest(shards), "train")),
        batch_size=8,
        image_size=32,
        train=True,
        augment_on_device=on_device,
    )
    n = batches_per_rank(spec, 1)
    kept, kept_pixels, kept_ids = [], [], set()
    for batch in make_loader(spec, 0, 1, workers=1, epoch=2, num_batches=n):
        kept.append(batch)
        kept_pixels.append(batch["image"].clone())
        kept_ids.add(_shm_id(batch["image"]))
    released_pixels, released_ids = [], set()
    for batch in make_loader(spec, 0, 1, workers=1, epoch=2, num_batches=n):
        released_pixels.append(batch["image"].clone())
        released_ids.add(_shm_id(batch["image"]))
        release(batch)
    assert len(kept_ids) == n > 12 and len(released_ids) <= BufferPool().keep
    for held, at_arrival, released in zip(kept, kept_pixels, released_pixels, strict=True):
        assert torch.equal(held["image"], at_arrival)
        assert torch.equal(released, at_arrival)


def test_in_process_stream_refills_in_place(shards):
    spec = StreamSpec(
        tuple(split_shards(shards, load_manifest(shards), "train")), batch_size=8, image_size=32, train=True
    )
    ptrs = set()
    for batch in make_loader(spec, 0, 1, workers=0, num_batches=4):
        ptrs.add(batch["image"].data_ptr())
        release(batch)
    kept = list(make_loader(spec, 0, 1, workers=0, num_batches=4))
    assert len(ptrs) == 1 and len({b["image"].data_ptr() for b in kept}) == 4
