"""bench eval (exact-once evaluation, 1 vs 2 ranks) and bench pack (loose files -> shards, 1 core vs all)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from retina_dist.bench.common import table
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.synthetic.layouts import synth


def _eval_rank(
    rank: int, world: int, port: int, shards: str, model_name: str, image_size: int, out: Any
) -> None:
    import torch.distributed as dist

    from retina_dist.config import Config
    from retina_dist.data.manifest import load_manifest, split_shards
    from retina_dist.data.stream import StreamSpec
    from retina_dist.data.stream.feeder import DeviceInputs
    from retina_dist.dist import DistEnv
    from retina_dist.engine.evaluate import Evaluator
    from retina_dist.models.backbone import create
    from retina_dist.tasks import build_task

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    m = load_manifest(shards)
    task = build_task(m)
    spec = StreamSpec(tuple(split_shards(shards, m, "train")), 32, image_size)
    model = create(model_name, task.num_classes, 3)
    cfg = Config()
    inputs = DeviceInputs(cfg.data.mean, cfg.data.std, 3, torch.device("cpu"))
    env = DistEnv(rank=rank, world_size=world)
    start = time.perf_counter()
    Evaluator(model, env, inputs, task, workers=1).predict(spec)
    if rank == 0:
        out.put(spec.count / (time.perf_counter() - start))
    if world > 1:
        dist.destroy_process_group()


def run_eval(work: Path, n: int, model_name: str, image_size: int) -> dict[str, Any]:
    shards = work / "eval-shards"
    pack(
        build_source("synthetic", n=n, image_size=image_size, seed=0),
        shards,
        PackOptions(val_frac=0.0, min_shards=8),
        progress=False,
    )
    rates = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = mp.get_context("spawn").Queue()
        mp.start_processes(
            _eval_rank,
            args=(world, port, str(shards), model_name, image_size, out),
            nprocs=world,
            start_method="spawn",
        )
        rates[world] = out.get()
    print(
        table(
            f"bench eval: exact-once evaluation, {n} images, {model_name} {image_size} px",
            ["ranks", "img/s", "speed-up"],
            [[1, rates[1], "1.00"], [2, rates[2], f"{rates[2] / rates[1]:.2f}"]],
        )
    )
    return {
        "n": n,
        "model": model_name,
        "image_size": image_size,
        "one_rank_img_s": rates[1],
        "two_ranks_img_s": rates[2],
        "speedup_2": rates[2] / rates[1],
    }


def run_pack(work: Path, n: int, height: int, max_side: int) -> dict[str, Any]:
    src = synth("aptos", work / "pack-src", n=n, size=height, seed=1)
    cores = os.cpu_count() or 1
    rates = {}
    for workers in sorted({1, cores}):
        out = work / f"pack-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        pack(
            build_source("aptos", src=src),
            out,
            PackOptions(max_side=max_side),
            workers=workers,
            progress=False,
        )
        rates[workers] = n / (time.perf_counter() - start)
    rows = [[w, r, f"{r / rates[1]:.2f}"] for w, r in rates.items()]
    print(
        table(
            f"bench pack: {n} APTOS-layout PNGs of height {height} -> shards (max side {max_side})",
            ["processes", "samples/s", "speed-up"],
            rows,
        )
    )
    return {
        "n": n,
        "height": height,
        "max_side": max_side,
        "rows": [{"processes": w, "samples_s": r} for w, r in rates.items()],
    }
