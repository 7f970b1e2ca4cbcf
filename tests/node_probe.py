"""One rank of a two-"node" torchrun job (tests/test_multinode.py): joins the group the way training
does, reads one training epoch of the stream as this rank and writes what it saw as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from retina_dist import dist
from retina_dist.config import load_config
from retina_dist.data.manifest import load_manifest
from retina_dist.data.stream import batches_per_rank, make_loader
from retina_dist.data.stream.buffers import release
from retina_dist.engine.specs import train_spec
from retina_dist.tasks import build_task


def main(shards: str, out: str) -> None:
    env = dist.init("gloo", 120)
    cfg = load_config("synthetic", [f"data.shards={shards}", "train.batch_size=16", "data.image_size=32"])
    manifest = load_manifest(shards)
    spec = train_spec(cfg, manifest, build_task(manifest), torch.device("cpu"))
    batches = batches_per_rank(spec, env.world_size, 1)
    keys: list[str] = []
    for batch in make_loader(spec, env.rank, env.world_size, 1, epoch=0, num_batches=batches):
        keys += batch["key"]
        release(batch)
    seen = dist.gather_objects(keys)
    record = {
        "rank": env.rank,
        "world": env.world_size,
        "local_rank": env.local_rank,
        "node": int(os.environ["GROUP_RANK"]),
        "batches": batches,
        "keys": keys,
        "all_keys": [k for ks in seen for k in ks],
    }
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(record))
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
