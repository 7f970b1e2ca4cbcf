"""``retina-dist bench``: measured throughput beside its baselines, each figure from one run."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "measured throughput beside its baselines: data | step | eval | pack | all, and scale"
WHAT = ("data", "step", "eval", "pack")  # what `all` runs; `scale` (minutes to hours) only by name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=(*WHAT, "all", "scale"), help="which measurement (all: each but scale)")
    p.add_argument("--out", default="runs/bench", help="folder for <what>.json")
    p.add_argument("--work", help="scratch folder for generated images and shards (default: <out>/work)")
    p.add_argument("--n", type=int, default=64, help="images generated for data/pack (eval: 4x)")
    p.add_argument("--height", type=int, default=1500, help="source fundus height in px (width 4/3 of it)")
    p.add_argument("--max-side", type=int, default=512, help="data/pack: the pack's --max-side")
    p.add_argument("--model", default="resnet18", help="step/eval: the timm model")
    p.add_argument("--image-size", type=int, default=224, help="network input size (eval: at most 128)")
    p.add_argument("--batch", type=int, default=32, help="batch size per rank")
    p.add_argument("--batches", type=int, default=12, help="data: batches timed per measurement")
    p.add_argument("--steps", type=int, default=10, help="step: optimizer steps timed per loop")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="step: autocast dtype")
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak for MFU (GPU default: a table)"
    )
    p.add_argument("--channels-last", action="store_true", help="step: NHWC model and inputs, both loops")
    p.add_argument("--compile", action="store_true", help="step: torch.compile the model, both loops")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="step: also the toolkit step with grad checkpointing",
    )
    p.add_argument(
        "--strategies",
        nargs="+",
        choices=("ddp", "zero1", "zero2", "fsdp"),
        help="step: instead of throughput, memory per rank of 2 ranks under each strategy (e.g. on "
        "vit_large_patch16_224 or convnext_large)",
    )
    p.add_argument("--workers", type=int, nargs="*", help="data: loader worker counts (default 1..cores)")
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[1000],
        help="scale: dataset sizes (Kermany's training set is 84484)",
    )


def run(args: argparse.Namespace) -> int:
    from retina_dist.bench import common

    out = Path(args.out)
    work = Path(args.work or out / "work")
    for what in WHAT if args.what == "all" else (args.what,):
        res = measure(what, args, work)
        name = "step-memory" if what == "step" and args.strategies else what
        print(f"-> {common.write(res, out / f'{name}.json')}\n")
    return 0


def measure(what: str, args: argparse.Namespace, work: Path) -> dict:
    if what == "data":
        from retina_dist.bench import data

        return data.run(
            work / "data",
            args.n,
            args.height,
            args.image_size,
            args.batch,
            args.batches,
            args.max_side,
            args.workers,
        )
    if what == "step" and args.strategies:
        from retina_dist.bench import memory

        return memory.run(args.strategies, args.model, args.image_size, args.batch, args.steps, args.amp)
    if what == "step":
        from retina_dist.bench import step

        return step.run(
            args.model,
            args.image_size,
            args.batch,
            args.steps,
            args.amp,
            args.peak_tflops,
            args.channels_last,
            args.compile,
            args.grad_checkpointing,
        )
    if what == "scale":
        from retina_dist.bench import scale

        return scale.run(work / "scale", args.sizes, args.image_size, args.batch)
    from retina_dist.bench import evalpack

    if what == "eval":
        return evalpack.run_eval(work / "eval", 4 * args.n, args.model, min(args.image_size, 128))
    return evalpack.run_pack(work / "pack", args.n, args.height, args.max_side)
