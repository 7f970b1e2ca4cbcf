"""The stream's output pinned, pipeline by pipeline, so the data path can be moved without a pixel
changing: sha256 of the first batches of a fixed-seed stream (keys, targets, pixels; for the device
pipeline the canvas, its matrices and the warped result). The digests were taken from the code before
the data path was regrouped; the same digests with 0 and 1 loader workers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.stream import StreamSpec, augment_device, make_loader
from retina_dist.data.stream.buffers import release

PIPELINES = {
    "eval": dict(train=False),
    "worker_warp": dict(train=True),
    "device_canvas": dict(train=True, augment_on_device=True),
}


@pytest.fixture(scope="module")
def pin_shards(tmp_path_factory, scratch):
    out = tmp_path_factory.mktemp("pin") / "s"
    pack(
        build_source("synthetic", n=96, image_size=56, seed=11),
        out,
        PackOptions(shard_size=24, seed=11),
        workers=1,
        progress=False,
    )
    return out


def _digest(shards, pipeline: str, workers: int) -> str:
    spec = StreamSpec(
        tuple(split_shards(shards, load_manifest(shards), "train")), 8, 40, **PIPELINES[pipeline]
    )
    h = hashlib.sha256()
    for batch in make_loader(spec, 0, 1, workers, epoch=1, num_batches=3):
        h.update("|".join(batch["key"]).encode())
        h.update(batch["target"].numpy().tobytes())
        h.update(np.ascontiguousarray(batch["image"].numpy()).tobytes())
        if "augment" in batch:
            plan = batch["augment"]
            h.update(plan["geometry"].numpy().tobytes() + plan["colour"].numpy().tobytes())
            warped = augment_device.apply(batch["image"], plan)
            h.update(warped.round().to(torch.uint8).numpy().tobytes())
        release(batch)
    return h.hexdigest()


# Taken at af0966b, before the data path was regrouped, and the same at every commit since, with the
# dependencies of .ci/constraints.txt. The device digest moved with a fresh install of the same direct
# pins (af0966b itself then gave the new value): the transitive dependencies are constrained since.
PINNED = {
    "eval": "3015989c288da558aa7b4e2d479af3f6571b77102a0866c447ffa99033383733",
    "worker_warp": "2d4a8e12784a451d14607aa354a767030504db236ad6bcc265c16cfaa4188a56",
    "device_canvas": "5378a2462a71d545fccc68d846f7d8d66268f9d6926672f96d83a0b244b0bc09",
}


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_stream_output_is_pinned(pin_shards, pipeline):
    in_process = _digest(pin_shards, pipeline, 0)
    assert _digest(pin_shards, pipeline, 1) == in_process
    assert in_process == PINNED[pipeline]
