"""``retina-dist pack``: a dataset (its folder or archive as downloaded) into shards + manifest.json."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("retina_dist")
HELP = "pack a dataset (folder or archive as downloaded) into shards + manifest.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dataset", help="aptos | kermany | octmnist | odir | rfmid | fusion | synthetic | synthetic_oct"
    )
    p.add_argument("--src", help="the dataset's folder or its archive (.zip, .tar.gz) exactly as downloaded")
    p.add_argument("--oct-src", help="fusion: the Kermany folder or archive (--src is APTOS)")
    p.add_argument("--out", required=True, help="shards folder to write (shards/<name>)")
    p.add_argument("--extract-dir", help="where archives are extracted (default: <out>/.extracted)")
    p.add_argument("--size", type=int, default=0, help="octmnist: which npz (28, 64, 128, 224)")
    p.add_argument("--n", type=int, default=2000, help="synthetic: number of images")
    p.add_argument("--image-size", type=int, default=128, help="synthetic: generated size in pixels")
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="shrink images whose longer side exceeds this (default 512: twice the usual 224-256 training "
        "size and above 384; 0 keeps originals' size; synthetic default 0)",
    )
    p.add_argument("--keep-original", action="store_true", help="also store the original bytes")
    p.add_argument("--format", default="jpg", choices=("jpg", "png", "keep"), help="resized images' codec")
    p.add_argument(
        "--max-corrupt-frac", type=float, default=0.05, help="fail when more images than this are unreadable"
    )
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--val-frac", type=float, default=0.15, help="validation share where the dataset has none")
    p.add_argument("--test-frac", type=float, default=0.0, help="test share where the dataset has none")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    p.add_argument("--workers", type=int, default=None, help="packing processes (default: all cores)")


def run(args: argparse.Namespace) -> int:
    from retina_dist.config import ConfigError
    from retina_dist.data.pack import PackOptions, pack
    from retina_dist.data.sources import SYNTHETIC, build_source
    from retina_dist.data.sources.archive import resolve_src

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
        s: {"count": v.count, "patients": v.patients, "shards": len(v.shards), "skipped": len(v.skipped)}
        for s, v in manifest.splits.items()
    }
    for what in ("missing_image", "unlabeled_image"):
        if manifest.source_report.get(what):
            n = manifest.source_report[what]
            log.warning("%s: %d %s (see manifest.json source_report)", args.dataset, n, what)
    print(json.dumps(summary))
    return 0
