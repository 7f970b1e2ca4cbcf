"""bench data: the shard stream vs loose files through PIL (the seeds' way) vs bare shard decode,
per worker count, on the same synthetic fundus photographs at camera resolution."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from retina_dist.bench.common import cycle, rate, table, worker_counts
from retina_dist.data.augment import build_transform
from retina_dist.data.codec import decode
from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.stream import StreamSpec, make_loader
from retina_dist.data.synth_layouts import synth


class LooseFiles(Dataset):
    """What a notebook does: open each PNG with PIL, augment, tensor."""

    def __init__(self, paths: list[Path], image_size: int) -> None:
        self.paths, self.transform = paths, build_transform(image_size, True, True, True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(self.transform(image=arr)["image"].transpose(2, 0, 1).copy())


class BareDecode(IterableDataset):
    """Only the decode of the packed bytes, the ceiling for the stream: counted inside the worker, so
    no pixels cross the process boundary (shipping full decoded frames would measure pickling)."""

    def __init__(self, shards: list[str], batch: int) -> None:
        self.shards, self.batch = shards, batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        done = 0
        while True:
            for path in mine:
                with tarfile.open(path) as tf:
                    for m in tf.getmembers():
                        if ".img." in m.name:
                            decode(tf.extractfile(m).read())
                            done += 1
                            if done == self.batch:
                                yield torch.tensor(done)
                                done = 0


def run(
    work: Path,
    n: int,
    height: int,
    image_size: int,
    batch: int,
    batches: int,
    max_side: int,
    workers: list[int] | None = None,
) -> dict[str, Any]:
    src = synth("aptos", work / "src", n=n, size=height, seed=0)
    out = work / "shards"
    m = pack(
        build_source("aptos", src=src),
        out,
        PackOptions(max_side=max_side, min_shards=8, val_frac=0.0),
        workers=None,
        progress=False,
    )
    paths = sorted((src / "train_images").glob("*.png"))
    spec = StreamSpec(tuple(split_shards(out, load_manifest(out), "train")), batch, image_size, train=True)
    shard_paths = [p for p, _ in spec.shards]
    rows, results = [], []
    for w in workers or worker_counts():
        stream = rate(make_loader(spec, 0, 1, w, num_batches=10**9), lambda b: len(b["key"]), batches)
        base_loader = DataLoader(
            LooseFiles(paths, image_size),
            batch_size=batch,
            shuffle=True,
            num_workers=w,
            persistent_workers=w > 0,
        )
        baseline = rate(cycle(lambda bl=base_loader: iter(bl)), len, batches)
        bare = rate(
            iter(DataLoader(BareDecode(shard_paths, batch), batch_size=None, num_workers=w)), int, batches
        )
        results.append(
            {
                "workers": w,
                "stream_img_s": stream,
                "baseline_img_s": baseline,
                "bare_decode_img_s": bare,
                "stream_over_baseline": stream / baseline,
                "stream_over_bare_decode": stream / bare,
            }
        )
        rows.append([w, stream, baseline, bare, f"{stream / baseline:.2f}", f"{stream / bare:.2f}"])
    src_px = Image.open(paths[0]).size
    print(
        table(
            f"bench data: {n} fundus PNGs {src_px[0]}x{src_px[1]} -> shards (max side {max_side}, JPEG) "
            f"-> {image_size} px, batch {batch}",
            ["workers", "stream img/s", "PIL files img/s", "bare decode img/s", "stream/PIL", "stream/bare"],
            rows,
        )
    )
    shard_bytes = sum(Path(p).stat().st_size for p in shard_paths)
    return {
        "source_px": list(src_px),
        "image_size": image_size,
        "batch": batch,
        "max_side": max_side,
        "shard_kib_per_sample": shard_bytes / m["splits"]["train"]["count"] / 1024,
        "source_kib_per_sample": sum(p.stat().st_size for p in paths) / len(paths) / 1024,
        "rows": results,
    }
