"""``retina-dist predict``: a trained run's calibrated predictions on images, folders or zips."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retina_dist.commands.common import device_name

HELP = "a trained run's calibrated predictions on images, folders or zips"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (runs/<name>)")
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) or .zip files")
    p.add_argument("--left", nargs="+", default=None, help="two-view models: first-view images, in order")
    p.add_argument("--right", nargs="+", default=None, help="two-view models: second-view images, in order")
    p.add_argument(
        "--out", default="preds.csv", help="CSV of probabilities (skipped inputs: <out>.skipped.csv)"
    )
    p.add_argument("--tta", action="store_true", default=None, help="average with the horizontal flip")
    p.add_argument(
        "--cam", action="store_true", help="an explanation per image into <out>_cam/, by the run's cam.method"
    )
    p.add_argument(
        "--explain",
        metavar="METHOD",
        help="an explanation per image into <out>_cam/ by METHOD: gradcam | gradcam++ | xgradcam | "
        "layercam | eigencam | ig (Integrated Gradients, captum) | rollout (ViT attention)",
    )
    p.add_argument("--batch", type=int, default=32, help="images per forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from retina_dist.cam.explainers import METHODS
    from retina_dist.config import ConfigError
    from retina_dist.infer.predict import predict_files
    from retina_dist.infer.predictor import Predictor

    if args.explain and args.explain not in METHODS:
        raise ConfigError(f"--explain {args.explain!r}: expected one of {', '.join(METHODS)}")
    if (args.left is None) != (args.right is None):
        raise ConfigError("--left and --right go together")
    if not args.inputs and args.left is None:
        raise ConfigError("nothing to predict: give image files, folders or zips (or --left/--right)")
    p = Predictor(args.run, device_name(args.device), args.tta)
    if args.left is not None and len(p.views) != 2:
        raise ConfigError(f"--left/--right: the model of {args.run} takes one image, not a pair")
    pairs = (args.left, args.right) if args.left is not None else None
    try:
        explain = args.explain or ("cam" if args.cam else "")
        s = predict_files(p, args.inputs, Path(args.out), pairs, args.batch, explain, not args.no_progress)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"predicted {s.predicted} in {s.seconds:.1f} s ({s.images_per_s:.1f} samples/s) -> {s.out}")
    if s.skipped:
        print(f"skipped {len(s.skipped)} (listed in {Path(s.out).stem}.skipped.csv):", file=sys.stderr)
        for k in s.skipped[:20]:
            print(f"  {k.name}: {k.reason}", file=sys.stderr)
    return 0 if s.predicted or not s.skipped else 1
