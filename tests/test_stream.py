import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest
import torch

from retina_dist.data.manifest import DataError, ShardInfo, load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.stream import StreamSpec, batches_per_rank, make_loader


@pytest.fixture(scope="module")
def odd_split(tmp_path_factory, scratch):
    """101 samples in 7 uneven shards of one split."""
    out = tmp_path_factory.mktemp("odd")
    pack(
        build_source("synthetic_oct", n=101, image_size=32),
        out,
        PackOptions(val_frac=1.0, shard_size=15, min_shards=7),
        workers=1,
        progress=False,
    )
    m = load_manifest(out)
    return out, tuple(split_shards(out, m, "val"))


def test_eval_stream_yields_every_key_once_across_ranks_and_workers(odd_split):
    _, shards = odd_split
    assert sum(n for _, n in shards) == 101 and len({n for _, n in shards}) > 1
    spec = StreamSpec(shards, batch_size=8, image_size=32)
    per_rank = []
    for rank in range(2):
        keys = [k for b in make_loader(spec, rank, 2, workers=2) for k in b["key"]]
        per_rank.append(keys)
    counts = Counter(per_rank[0] + per_rank[1])
    assert len(counts) == 101 and set(counts.values()) == {1}
    assert len(per_rank[0]) != len(per_rank[1])  # uneven ranks, nothing padded


def test_train_stream_gives_every_rank_the_same_batch_count(shards):
    m = load_manifest(shards)
    spec = StreamSpec(tuple(split_shards(shards, m, "train")), batch_size=16, image_size=32, train=True)
    n = batches_per_rank(spec, world_size=2, accum_steps=2)
    assert n > 0 and n % 2 == 0
    for rank in range(2):
        batches = list(make_loader(spec, rank, 2, workers=2, epoch=0, num_batches=n))
        assert len(batches) == n
        assert all(b["image"].shape == (16, 3, 32, 32) and b["image"].dtype == torch.uint8 for b in batches)


def test_epochs_differ_and_resume_skips_exactly(shards):
    m = load_manifest(shards)
    spec = StreamSpec(tuple(split_shards(shards, m, "train")), batch_size=8, image_size=32, train=True)
    n = batches_per_rank(spec, 1)
    full = list(make_loader(spec, 0, 1, workers=2, epoch=1, num_batches=n))
    again = list(make_loader(spec, 0, 1, workers=2, epoch=1, num_batches=n))
    other = list(make_loader(spec, 0, 1, workers=2, epoch=2, num_batches=n))
    assert [b["key"] for b in full] == [b["key"] for b in again]
    assert [b["key"] for b in full] != [b["key"] for b in other]
    for skip in (3, 4):
        resumed = list(make_loader(spec, 0, 1, workers=2, epoch=1, num_batches=n, skip_batches=skip))
        assert [b["key"] for b in resumed] == [b["key"] for b in full[skip:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[skip:], strict=True))


def test_missing_shard_and_empty_split_are_named(odd_split, tmp_path):
    out, _ = odd_split
    m = load_manifest(out)
    with pytest.raises(DataError, match="no split 'train'"):
        split_shards(out, m, "train")
    val = m.splits["val"]
    broken = replace(m, splits={"val": replace(val, shards=[ShardInfo("val-999999.tar", 1, "")])})
    with pytest.raises(DataError, match="val-999999.tar: shard listed in the manifest is missing"):
        split_shards(out, broken, "val")
    empty = replace(m, splits={"val": replace(val, count=0, shards=[])})
    with pytest.raises(DataError, match="split 'val' is empty"):
        split_shards(out, empty, "val")
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(tmp_path)


def test_program_that_fails_with_a_loader_alive_exits_with_its_error(shards):
    """Loader workers ignore SIGTERM (SLURM's preemption signal is the main process's to handle), so
    an uncaught error, whose traceback keeps the loader alive, must still end the program: it once
    waited forever in multiprocessing's exit handler (a CI run hung 900 s in `bench`)."""
    script = (
        "from retina_dist.data.manifest import load_manifest, split_shards\n"
        "from retina_dist.data.stream import StreamSpec, make_loader\n"
        f"root = {str(shards)!r}\n"
        "spec = StreamSpec(tuple(split_shards(root, load_manifest(root), 'train')), 4, 32, train=True)\n"
        "it = iter(make_loader(spec, 0, 1, workers=2, num_batches=1000))\n"
        "next(it)\n"
        "raise SystemError('the step failed')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.rstrip().endswith("SystemError: the step failed")
    assert "worker" not in proc.stderr  # no report of killed workers on top of the real error
