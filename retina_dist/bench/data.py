"""bench data: the shard stream against the loaders a user would pick instead (timm's, a webdataset
pipeline, torchvision's ImageFolder: ``bench/peers.py``) on the same pre-resized JPEG bytes, against
bare shard decode (its ceiling), and against full-resolution PNGs through PIL (a notebook's way), per
worker count, on the same synthetic fundus photographs."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from retina_dist.bench import peers
from retina_dist.bench.common import cycle, rate, table, worker_counts
from retina_dist.data.codec import decode
from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sample_format import image_member
from retina_dist.data.sources import build_source
from retina_dist.data.stream import StreamSpec, augment_device, make_loader, worker_init
from retina_dist.data.stream.augment import build_transform
from retina_dist.data.stream.buffers import release
from retina_dist.data.stream.shard_reader import read_samples
from retina_dist.data.synthetic.layouts import synth


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
    """Only the reading and decode of the packed bytes, the ceiling for the stream: the stream's own
    shard reader and decoder call in workers set up as the stream's are (allocator included),
    counted inside the worker, so no pixels cross the process boundary (shipping full decoded frames
    would measure pickling)."""

    def __init__(self, shards: list[str], batch: int) -> None:
        self.shards, self.batch = shards, batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        done = 0
        while True:
            for sample in read_samples(mine):
                image = sample[image_member(sample, "img", True)]
                decode(image, bgr=True)  # the stream's call
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
    repeats: int = 3,
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
    dev_spec = dataclasses.replace(spec, augment_on_device=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shard_paths = [p for p, _ in spec.shards]
    tree = peers.export_tree(shard_paths, work / "tree")
    rows, results = [], []
    for w in workers or worker_counts():
        # Timed from a drained queue: each loader's prefetched backlog (at most 4 batches a worker)
        # is consumed first, or it would be counted as if produced in no time.
        warm = 4 * max(w, 1) + 1
        base_loader = DataLoader(
            LooseFiles(paths, image_size),
            batch_size=batch,
            shuffle=True,
            num_workers=w,
            persistent_workers=w > 0,
        )
        baseline = rate(cycle(lambda bl=base_loader: iter(bl)), len, batches, warm)
        del base_loader  # its workers would otherwise share the cores with what is timed next
        # The fast loaders are timed `repeats` times, interleaved, and the median kept: the ratios
        # compare like with like even when the machine's speed drifts between measurements.
        runs: dict[str, list[float]] = {"stream": [], "device": [], "bare": []}
        runs.update({name: [] for name in peers.PEERS})
        for _ in range(repeats):
            runs["stream"].append(
                rate(make_loader(spec, 0, 1, w, num_batches=10**9), _consume, batches, warm)
            )
            # Augmentation on the device: the workers' side (decode + canvas), what a GPU node's
            # loader must sustain while the device warps each batch alongside the model's step.
            runs["device"].append(
                rate(make_loader(dev_spec, 0, 1, w, num_batches=10**9), _consume, batches, warm)
            )
            bare_loader = DataLoader(
                BareDecode(shard_paths, batch), batch_size=None, num_workers=w, worker_init_fn=worker_init
            )
            runs["bare"].append(rate(iter(bare_loader), int, batches, warm))
            del bare_loader
            for name in peers.PEERS:
                batches_of = peers.loader(name, shard_paths, tree, image_size, batch, w)
                runs[name].append(rate(batches_of, peers.batch_len, batches, warm))
                del batches_of
        stream, dev_loader, bare = (statistics.median(runs[k]) for k in ("stream", "device", "bare"))
        peer = {name: statistics.median(runs[name]) for name in peers.PEERS}
        best = max(peer, key=lambda k: peer[k])
        results.append(
            {
                "workers": w,
                **{f"{name}_img_s": v for name, v in peer.items()},
                "best_peer": best,
                "stream_over_best_peer": stream / peer[best],
                "device_augment_stream_over_best_peer": dev_loader / peer[best],
                "stream_img_s": stream,
                "stream_device_augment_img_s": dev_loader,
                "baseline_img_s": baseline,
                "bare_decode_img_s": bare,
                "stream_over_baseline": stream / baseline,
                "stream_over_bare_decode": stream / bare,
                "device_augment_stream_over_bare_decode": dev_loader / bare,
            }
        )
        rows.append(
            [
                w,
                stream,
                dev_loader,
                *peer.values(),
                f"{stream / peer[best]:.2f} ({best})",
                f"{dev_loader / peer[best]:.2f}",
                baseline,
                bare,
                f"{stream / baseline:.2f}",
                f"{stream / bare:.2f}",
                f"{dev_loader / bare:.2f}",
            ]
        )
    aug_ms = device_augment_ms(dev_spec, device, batches)
    src_px = Image.open(paths[0]).size
    print(
        table(
            f"bench data: {n} fundus PNGs {src_px[0]}x{src_px[1]} -> shards (max side {max_side}, JPEG) "
            f"-> {image_size} px, batch {batch}",
            [
                "workers",
                "stream img/s",
                "stream, aug on device img/s",
                *(f"{name} img/s" for name in peers.PEERS),
                "stream/best peer",
                "aug-on-device stream/best peer",
                "full-res PNG via PIL img/s",
                "bare decode img/s",
                "stream/PIL",
                "stream/bare",
                "aug-on-device stream/bare",
            ],
            rows,
        )
    )
    print(
        f"augmentation on the device ({device.type}): {aug_ms:.3f} ms per image "
        f"(training uses it {'by default here' if device.type == 'cuda' else 'when data.augment_on=device'})"
    )
    shard_bytes = sum(Path(p).stat().st_size for p in shard_paths)
    return {
        "source_px": list(src_px),
        "image_size": image_size,
        "batch": batch,
        "max_side": max_side,
        "device": device.type,
        "device_augment_ms_per_img": aug_ms,
        "shard_kib_per_sample": shard_bytes / m.splits["train"].count / 1024,
        "source_kib_per_sample": sum(p.stat().st_size for p in paths) / len(paths) / 1024,
        "rows": results,
    }


def _consume(batch: dict[str, Any]) -> int:
    """What the trainer does with a batch, less the step: hand its buffer back to the worker."""
    release(batch)
    return len(batch["key"])


def device_augment_ms(spec: StreamSpec, device: torch.device, batches: int) -> float:
    """Milliseconds per image for the device-side warp + colour on ``device``, batches already loaded."""
    loaded = list(itertools.islice(iter(make_loader(spec, 0, 1, 0, num_batches=10**9)), max(2, batches // 4)))
    on_device = [(b["image"].to(device), b["augment"]) for b in loaded]
    augment_device.apply(*on_device[0])  # warm-up (CUDA kernels, allocator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for image, plan in on_device:
        augment_device.apply(image, plan)
    sync()
    return (time.perf_counter() - start) * 1000 / sum(len(b["key"]) for b in loaded)
