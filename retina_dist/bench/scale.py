"""bench scale: how packing, streaming and evaluation costs grow with the dataset, on Kermany's own
layout and image size (512 x 496 grey JPEGs, `synth kermany --size 496`), at each ``--sizes`` n.

Per n: pack on all cores (samples/s, the most memory the packer and its workers took) and on one core (the
speed-up), shard count and size, manifest size, one epoch of the training split streamed (img/s),
and an exact-once evaluation of the test split with the size of the predictions rank 0 gathers.
Costs that grow linearly keep img/s flat across n; a bounded packer keeps its peak RSS flat."""

from __future__ import annotations

import os
import pickle
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from retina_dist.bench.common import table
from retina_dist.data.manifest import MANIFEST, load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.synthetic.layouts import synth

HEIGHT = 496  # Kermany's B-scans: 496 rows, 512 (most), 768 or 1024 columns


class PeakRSS:
    """The most memory the work inside the ``with`` took: this process's resident growth since
    entering plus each child's unique pages (forked workers share the parent's pages copy-on-write;
    their RSS would count those twice). Sampled every 200 ms: reading a worker's unique pages costs
    CPU that the packing would feel at a finer rate."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._me = psutil.Process()
        self._base = self._me.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = self._me.memory_info().rss - self._base
            for p in self._me.children(recursive=True):
                try:
                    total += p.memory_full_info().uss
                except psutil.Error:  # a worker that just ended
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _pack(src: Path, out: Path, workers: int) -> tuple[float, int]:
    """Seconds and peak memory of packing ``src``, in a fresh process as `retina-dist pack` runs:
    forked workers would otherwise copy this process's heap (torch, the last size's stream) page by
    page and count it as theirs."""
    import multiprocessing as mp

    shutil.rmtree(out, ignore_errors=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_pack_here, args=(src, out, workers, results))  # not daemonic: it has workers
    proc.start()
    while True:
        try:
            took, peak = results.get(timeout=1)
            break
        except queue.Empty:
            if not proc.is_alive():  # its traceback is on stderr
                raise RuntimeError(f"packing {src} failed (exit {proc.exitcode})") from None
    proc.join()
    return took, peak


def _pack_here(src: Path, out: Path, workers: int, results: Any) -> None:
    with PeakRSS() as rss:
        started = time.perf_counter()
        pack(
            build_source("kermany", src=src), out, PackOptions(max_side=512), workers=workers, progress=False
        )
        took = time.perf_counter() - started
    results.put((took, rss.peak))


def _stream(shards: Path, image_size: int, batch: int, workers: int) -> tuple[int, float]:
    from retina_dist.data.stream import StreamSpec, batches_per_rank, make_loader

    m = load_manifest(shards)
    spec = StreamSpec(
        tuple(split_shards(shards, m, "train")), batch, image_size, train=True, augment=True, in_chans=1
    )
    started, seen = time.perf_counter(), 0
    # A training epoch is whole batches (the trainer's count); the remainder waits for the next one.
    for b in make_loader(spec, 0, 1, workers, num_batches=batches_per_rank(spec, 1)):
        seen += len(b["key"])
    return seen, time.perf_counter() - started


def _evaluate(shards: Path, image_size: int, model_name: str) -> dict[str, Any]:
    from retina_dist.config import Config
    from retina_dist.data.stream import StreamSpec
    from retina_dist.data.stream.feeder import DeviceInputs
    from retina_dist.dist import DistEnv
    from retina_dist.engine.evaluate import Evaluator
    from retina_dist.models.backbone import create
    from retina_dist.tasks import build_task

    m = load_manifest(shards)
    task = build_task(m)
    spec = StreamSpec(tuple(split_shards(shards, m, "test")), 64, image_size, in_chans=1)
    cfg = Config()
    inputs = DeviceInputs(cfg.data.mean[:1], cfg.data.std[:1], 1, torch.device("cpu"))
    model = create(model_name, task.num_classes, 1).eval()
    started = time.perf_counter()
    preds = Evaluator(model, DistEnv(), inputs, task, workers=1).predict(spec)
    took = time.perf_counter() - started
    assert preds is not None and len(set(preds.keys)) == len(preds.keys) == m.splits["test"].count
    gathered = len(pickle.dumps((preds.keys, preds.target, preds.probs, preds.patients)))
    return {
        "test_images": len(preds.keys),
        "eval_img_s": len(preds.keys) / took,
        "gather_kib": gathered / 1024,
    }


def run(
    work: Path, sizes: list[int], image_size: int = 224, batch: int = 64, one_core_max: int = 10_000
) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    for n in sizes:
        src = work / f"kermany-{n}"
        if not src.exists():  # the images are a pure function of (seed, n): reused across runs
            started = time.perf_counter()
            synth("kermany", src.with_name(src.name + ".tmp"), n, HEIGHT, 0, "mendeley-v2")
            src.with_name(src.name + ".tmp").rename(src)
            print(f"synth kermany --n {n} --size {HEIGHT}: {time.perf_counter() - started:.0f} s", flush=True)
        shards = work / f"shards-{n}"
        took, peak = _pack(src, shards, cores)
        row: dict[str, Any] = {"n": n, "pack_img_s": n / took, "pack_peak_mib": peak / 2**20}
        if n <= one_core_max and cores > 1:
            one, _ = _pack(src, work / f"shards-{n}-1core", 1)
            shutil.rmtree(work / f"shards-{n}-1core")
            row["pack_1core_img_s"] = n / one
            row["pack_speedup"] = one / took
        files = sorted(shards.glob("*.tar"))
        row["shards"] = len(files)
        row["shards_mib"] = sum(f.stat().st_size for f in files) / 2**20
        row["manifest_kib"] = (shards / MANIFEST).stat().st_size / 1024
        seen, secs = _stream(shards, image_size, batch, cores)
        row.update(train_images=seen, stream_img_s=seen / secs)
        row.update(_evaluate(shards, 64, "resnet10t"))
        rows.append(row)
        print(f"n={n}: {row}", flush=True)
    print(
        table(
            f"bench scale: Kermany layout, {HEIGHT}-row grey JPEGs; pack on {cores} cores; stream one epoch "
            f"at {image_size} px, batch {batch}, {cores} workers; exact-once eval of the test split",
            [
                "images",
                "pack img/s",
                "÷ 1 core",
                "pack MiB",
                "shards",
                "MiB",
                "manifest KiB",
                "stream img/s",
                "eval img/s",
                "gathered KiB",
            ],
            [
                [
                    r["n"],
                    r["pack_img_s"],
                    f"{r['pack_speedup']:.2f}" if "pack_speedup" in r else "—",
                    r["pack_peak_mib"],
                    r["shards"],
                    r["shards_mib"],
                    r["manifest_kib"],
                    r["stream_img_s"],
                    r["eval_img_s"],
                    r["gather_kib"],
                ]
                for r in rows
            ],
        )
    )
    return {"image_size": image_size, "batch": batch, "cores": cores, "rows": rows}
