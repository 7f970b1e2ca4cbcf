"""``retina-dist``: pack, train, evaluate and verify — or ``run`` for all of it; then predict, export
and serve a trained run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from retina_dist.config import Config, ConfigError, load_config, save_config
from retina_dist.data.manifest import DataError
from retina_dist.engine.checkpoint import ResumeError
from retina_dist.infer.commands import COMMANDS as USE_COMMANDS
from retina_dist.infer.commands import add_parsers as add_use_commands
from retina_dist.infer.commands import dispatch as use_command

log = logging.getLogger("retina_dist")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="synthetic", help="preset name (retina_dist/presets) or a YAML file")
    p.add_argument("--run-dir", help="run folder (default: the preset's run_dir)")
    p.add_argument("--nproc", type=int, default=1, help="local processes to start through torchrun")
    p.add_argument("--smoke", action="store_true", help="tiny model, few small images, 2 epochs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retina-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_args(sub.add_parser("run", help="pack (if needed) -> train -> evaluate -> figures"))
    _run_args(sub.add_parser("train", help="train (and evaluate) on packed shards"))
    _run_args(
        sub.add_parser(
            "prepare",
            help="check the config and the shards (packing a synthetic set if needed), then exit: "
            "what a batch script runs once before starting its ranks",
        )
    )
    ev = sub.add_parser("eval", help="exact-once evaluation of a run's latest checkpoint")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--split", action="append", help="split(s) to evaluate (default: the run's eval.splits)")
    ev.add_argument("--nproc", type=int, default=1)
    ev.add_argument("--weights", help="evaluate this plain state dict (e.g. from consolidate) instead")
    cm = sub.add_parser(
        "cam", help="class activation maps for a run, exact-once across ranks, scored on lesions"
    )
    cm.add_argument("--run-dir", required=True)
    cm.add_argument("--split", help="default: the run's cam.split (val)")
    cm.add_argument("--method", help="gradcam | gradcam++ | xgradcam | layercam | eigencam")
    cm.add_argument("--select", help="all | errors | correct | per-class:K")
    cm.add_argument("--limit", type=int, help="at most N samples (0: all)")
    cm.add_argument("--target-layer", help="module path to explain instead of the family's default")
    cm.add_argument("--nproc", type=int, default=1)
    bn = sub.add_parser(
        "bench", help="measured throughput beside its baselines: data | step | eval | pack | all"
    )
    bn.add_argument("what", choices=("data", "step", "eval", "pack", "all"))
    bn.add_argument("--out", default="runs/bench", help="folder for <what>.json")
    bn.add_argument("--work", help="scratch folder for generated images and shards (default: <out>/work)")
    bn.add_argument("--n", type=int, default=64, help="images generated for data/pack (eval: 4x)")
    bn.add_argument("--height", type=int, default=1500, help="source fundus height in px (width 4/3 of it)")
    bn.add_argument("--max-side", type=int, default=512)
    bn.add_argument("--model", default="resnet18")
    bn.add_argument("--image-size", type=int, default=224)
    bn.add_argument("--batch", type=int, default=32)
    bn.add_argument("--batches", type=int, default=12, help="batches timed per measurement")
    bn.add_argument("--steps", type=int, default=10)
    bn.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    bn.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device peak for MFU (GPU default: a table)"
    )
    bn.add_argument("--channels-last", action="store_true", help="step: NHWC model and inputs, both loops")
    bn.add_argument("--compile", action="store_true", help="step: torch.compile the model, both loops")
    bn.add_argument("--workers", type=int, nargs="*", help="loader worker counts (default 1..cores)")
    co = sub.add_parser(
        "consolidate", help="a run's latest checkpoint (ZeRO shards too) -> one plain state dict"
    )
    co.add_argument("--run-dir", required=True)
    co.add_argument("--out", help="default: <run-dir>/checkpoints/consolidated.pt")
    pk = sub.add_parser(
        "pack", help="pack a dataset (folder or archive as downloaded) into shards + manifest.json"
    )
    pk.add_argument(
        "dataset", help="aptos | kermany | octmnist | odir | rfmid | fusion | synthetic | synthetic_oct"
    )
    pk.add_argument("--src", help="the dataset's folder or its archive (.zip, .tar.gz) exactly as downloaded")
    pk.add_argument("--oct-src", help="fusion: the Kermany folder or archive (--src is APTOS)")
    pk.add_argument("--out", required=True)
    pk.add_argument("--extract-dir", help="where archives are extracted (default: <out>/.extracted)")
    pk.add_argument("--size", type=int, default=0, help="octmnist: which npz (28, 64, 128, 224)")
    pk.add_argument("--n", type=int, default=2000, help="synthetic: number of images")
    pk.add_argument("--image-size", type=int, default=128, help="synthetic: generated size in pixels")
    pk.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="shrink images whose longer side exceeds this (default 512: twice the usual 224-256 training "
        "size and above 384; 0 keeps originals' size; synthetic default 0)",
    )
    pk.add_argument("--keep-original", action="store_true", help="also store the original bytes")
    pk.add_argument("--format", default="jpg", choices=("jpg", "png", "keep"), help="resized images' codec")
    pk.add_argument("--max-corrupt-frac", type=float, default=0.05)
    pk.add_argument("--shard-size", type=int, default=256)
    pk.add_argument("--val-frac", type=float, default=0.15)
    pk.add_argument("--test-frac", type=float, default=0.0)
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--workers", type=int, default=None, help="packing processes (default: all cores)")
    sy = sub.add_parser("synth", help="write synthetic images in a real dataset's on-disk layout")
    sy.add_argument("dataset", help="aptos | kermany | octmnist | odir | rfmid")
    sy.add_argument("--out", required=True)
    sy.add_argument("--n", type=int, default=40, help="samples (patients for odir)")
    sy.add_argument(
        "--size", type=int, default=64, help="base image height in pixels (octmnist: 28/64/128/224)"
    )
    sy.add_argument("--version", help="layout version (default: the first listed for the dataset)")
    sy.add_argument("--columns", type=int, default=47, choices=(47, 30), help="rfmid: label CSV columns")
    sy.add_argument("--archive", choices=("zip", "tar.gz"), help="also pack the tree as a downloaded archive")
    sy.add_argument("--seed", type=int, default=0)
    vf = sub.add_parser("verify", help="re-read every shard and check counts and sha256 against the manifest")
    vf.add_argument("shards")
    add_use_commands(sub)
    return parser


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    return load_config(args.preset, overrides, smoke=args.smoke)


def _pack_for(cfg: Config) -> None:
    """Pack the preset's dataset if its shards are missing: from ``data.src`` when given, else from
    the dataset's synthetic twin written in its real layout (no download needed)."""
    from retina_dist.data.archive import resolve_src
    from retina_dist.data.manifest import MANIFEST
    from retina_dist.data.pack import PackOptions, pack
    from retina_dist.data.sources import SYNTHETIC, build_source

    d = cfg.data
    out = Path(d.shards)
    if (out / MANIFEST).exists():
        return
    progress = sys.stderr.isatty()
    if d.dataset in SYNTHETIC:
        source = build_source(d.dataset, n=d.n, image_size=d.pack_size, seed=cfg.train.seed)
        pack(source, out, PackOptions(seed=cfg.train.seed), progress=progress)
        return
    from retina_dist.data.synth_layouts import synth

    extract = out.with_name(out.name + ".extracted")
    if d.src:
        src = resolve_src(d.src, extract)
        oct_src = resolve_src(d.oct_src, extract) if d.oct_src else None
    else:
        twin = out.with_name(out.name + ".synthetic-src")
        log.warning(
            "data.src is empty: packing a synthetic %s twin (%d samples) written to %s", d.dataset, d.n, twin
        )
        if d.dataset == "fusion":
            src = synth("aptos", twin / "aptos", d.n, d.pack_size, cfg.train.seed)
            oct_src = synth("kermany", twin / "kermany", d.n, d.pack_size, cfg.train.seed)
        else:
            src, oct_src = synth(d.dataset, twin, d.n, d.pack_size, cfg.train.seed), None
    try:
        source = build_source(d.dataset, src=src, oct_src=oct_src, seed=cfg.train.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    pack(source, out, PackOptions(max_side=512, seed=cfg.train.seed), progress=progress)


def _pack_command(args: argparse.Namespace) -> int:
    from retina_dist.data.archive import resolve_src
    from retina_dist.data.pack import PackOptions, pack
    from retina_dist.data.sources import SYNTHETIC, build_source

    extract_dir = Path(args.extract_dir or Path(args.out) / ".extracted")
    if args.dataset in SYNTHETIC:
        source = build_source(args.dataset, n=args.n, image_size=args.image_size, seed=args.seed)
    else:
        if not args.src:
            raise ConfigError(f"pack {args.dataset}: --src (the dataset folder or archive) is required")
        oct_src = resolve_src(args.oct_src, extract_dir) if args.oct_src else None
        try:
            source = build_source(
                args.dataset,
                src=resolve_src(args.src, extract_dir),
                oct_src=oct_src,
                size=args.size,
                seed=args.seed,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err
    max_side = args.max_side if args.max_side is not None else (0 if args.dataset in SYNTHETIC else 512)
    opts = PackOptions(
        val_frac=args.val_frac,
        test_frac=args.test_frac,
        shard_size=args.shard_size,
        max_side=max_side,
        keep_original=args.keep_original,
        image_format=args.format,
        max_corrupt_frac=args.max_corrupt_frac,
        seed=args.seed,
    )
    manifest = pack(source, args.out, opts, workers=args.workers, progress=sys.stderr.isatty())
    summary = {
        s: {
            "count": v["count"],
            "patients": v["patients"],
            "shards": len(v["shards"]),
            "skipped": len(v["skipped"]),
        }
        for s, v in manifest["splits"].items()
    }
    report = manifest.get("source_report", {})
    for what in ("missing_image", "unlabeled_image"):
        if report.get(what):
            log.warning("%s: %d %s (see manifest.json source_report)", args.dataset, report[what], what)
    print(json.dumps(summary))
    return 0


def _prepare(cfg: Config) -> int:
    from retina_dist.data.manifest import load_manifest, split_shards

    _pack_for(cfg)
    manifest = load_manifest(cfg.data.shards)
    for split in {cfg.data.train_split, cfg.data.val_split, *cfg.eval.splits}:
        split_shards(cfg.data.shards, manifest, split)  # a missing split or shard fails here, not on N ranks
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    print(cfg.run_dir)
    return 0


def launch_local(nproc: int, argv: list[str]) -> None:
    """Start ``nproc`` workers of ``python -m retina_dist <argv>`` through torch's elastic launcher."""
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    run(
        get_args_parser().parse_args(
            ["--standalone", f"--nproc-per-node={nproc}", "-m", "retina_dist", *argv]
        )
    )


def _train(cfg: Config, nproc: int) -> int:
    from retina_dist.dist import discover

    if nproc > 1 and not discover().distributed:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        resolved = Path(cfg.run_dir) / "config.yaml"
        save_config(cfg, resolved)
        launch_local(nproc, ["train", "--preset", str(resolved)])
        return 0
    from retina_dist.engine.train import EXIT_PREEMPTED, train

    outcome = train(cfg)
    return EXIT_PREEMPTED if outcome == "preempted" else 0


def _eval(args: argparse.Namespace) -> int:
    resolved = Path(args.run_dir) / "config.yaml"
    cfg = load_config(str(resolved))
    if args.split:
        cfg.eval.splits = args.split
    if args.nproc > 1:
        weights = ["--weights", args.weights] if args.weights else []
        splits = [a for s in args.split or [] for a in ("--split", s)]
        launch_local(args.nproc, ["eval", "--run-dir", args.run_dir, *splits, *weights])
        return 0
    from retina_dist.engine.train import Trainer
    from retina_dist.models import load_pretrained

    trainer = Trainer(cfg)
    if args.weights:
        load_pretrained(trainer.strategy.module, args.weights)
    elif trainer.ckpt.latest() is None:
        raise ConfigError(f"{args.run_dir}: no checkpoint to evaluate")
    for split in cfg.eval.splits:
        trainer._validate(split)
    trainer.monitor.close()
    return 0


def _cam(args: argparse.Namespace) -> int:
    cfg = load_config(str(Path(args.run_dir) / "config.yaml"))
    c = cfg.cam
    split, method = args.split or c.split, args.method or c.method
    how = args.select or c.select
    limit = c.limit if args.limit is None else args.limit
    layer = args.target_layer if args.target_layer is not None else c.target_layer
    if args.nproc > 1:
        argv = [
            "cam",
            "--run-dir",
            args.run_dir,
            "--split",
            split,
            "--method",
            method,
            "--select",
            how,
            "--limit",
            str(limit),
            "--target-layer",
            layer,
        ]
        launch_local(args.nproc, argv)
        return 0
    from retina_dist.cam.runner import run_cam

    run_cam(cfg, split, method, limit, how, layer)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from retina_dist.bench import common

    out = Path(args.out)
    work = Path(args.work or out / "work")
    what = ["data", "step", "eval", "pack"] if args.what == "all" else [args.what]
    for w in what:
        if w == "data":
            from retina_dist.bench import data

            res = data.run(
                work / "data",
                args.n,
                args.height,
                args.image_size,
                args.batch,
                args.batches,
                args.max_side,
                args.workers,
            )
        elif w == "step":
            from retina_dist.bench import step

            res = step.run(
                args.model,
                args.image_size,
                args.batch,
                args.steps,
                args.amp,
                args.peak_tflops,
                args.channels_last,
                args.compile,
            )
        elif w == "eval":
            from retina_dist.bench import evalpack

            res = evalpack.run_eval(work / "eval", 4 * args.n, args.model, min(args.image_size, 128))
        else:
            from retina_dist.bench import evalpack

            res = evalpack.run_pack(work / "pack", args.n, args.height, args.max_side)
        print(f"-> {common.write(res, out / f'{w}.json')}\n")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from retina_dist.engine.checkpoint import Checkpointer, load, save_atomic

    path = Checkpointer(Path(args.run_dir) / "checkpoints").latest()
    if path is None:
        raise ConfigError(f"{args.run_dir}: no checkpoint to consolidate")
    if path.is_dir():
        from retina_dist.engine.deepspeed_strategy import consolidate

        state = consolidate(path)
    else:
        state = load(path)["model"]
    out = Path(args.out or Path(args.run_dir) / "checkpoints" / "consolidated.pt")
    save_atomic({"model": state}, out)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may sit on either side of options (``train --nproc 2 a=1 --smoke b=2``).
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prepare":
            return _prepare(_config(args))
        if args.command in ("run", "train"):
            cfg = _config(args)  # validated before any process starts
            if args.command == "run":
                _pack_for(cfg)
            code = _train(cfg, args.nproc)
            if args.command == "run" and code == 0 and cfg.cam.enabled:
                cam_args = argparse.Namespace(
                    run_dir=cfg.run_dir,
                    split=None,
                    method=None,
                    select=None,
                    limit=None,
                    target_layer=None,
                    nproc=args.nproc,
                )
                return _cam(cam_args)
            return code
        if args.command == "cam":
            return _cam(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "pack":
            return _pack_command(args)
        if args.command == "synth":
            from retina_dist.data.synth_layouts import synth

            print(
                synth(
                    args.dataset,
                    args.out,
                    args.n,
                    args.size,
                    args.seed,
                    args.version,
                    args.archive,
                    args.columns,
                )
            )
            return 0
        if args.command in USE_COMMANDS:
            return use_command(args)
        if args.command == "consolidate":
            return _consolidate(args)
        if args.command == "verify":
            from retina_dist.data.manifest import verify

            print(json.dumps(verify(args.shards)))
            return 0
    except (ConfigError, DataError, FileNotFoundError, ResumeError) as err:  # the user's to fix: no traceback
        log.error("%s", err)
        return 2
    return 1
