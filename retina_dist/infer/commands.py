"""The ``predict``, ``export`` and ``serve`` subcommands: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("retina_dist")
COMMANDS = ("predict", "export", "serve")


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="a trained run's calibrated predictions on images, folders or zips")
    pr.add_argument("--run", required=True, help="run folder (runs/<name>)")
    pr.add_argument("inputs", nargs="*", help="image files, folders (recursive) or .zip files")
    pr.add_argument("--left", nargs="+", default=None, help="two-view models: first-view images, in order")
    pr.add_argument("--right", nargs="+", default=None, help="two-view models: second-view images, in order")
    pr.add_argument(
        "--out", default="preds.csv", help="CSV of probabilities (skipped inputs: <out>.skipped.csv)"
    )
    pr.add_argument("--tta", action="store_true", default=None, help="average with the horizontal flip")
    pr.add_argument("--cam", action="store_true", help="write a CAM overlay per image into <out>_cam/")
    pr.add_argument("--batch", type=int, default=32)
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    pr.add_argument("--no-progress", action="store_true")
    ex = sub.add_parser(
        "export", help="TorchScript or ONNX with preprocessing and calibration inside, + model card"
    )
    ex.add_argument("--run", required=True)
    ex.add_argument("--format", choices=("torchscript", "onnx"), default="onnx")
    ex.add_argument("--out", help="output file (default: <run>/export/model.{pt,onnx})")
    sv = sub.add_parser("serve", help="a small web page: upload an image, see probabilities and the CAM")
    sv.add_argument("--run", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload-mb", type=float, default=20.0)
    sv.add_argument("--device", default="auto")


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "predict":
        return _predict(args)
    if args.command == "export":
        from retina_dist.infer.export import export

        print(json.dumps(export(args.run, args.format, args.out), indent=1))
        return 0
    return _serve(args)


def _predict(args: argparse.Namespace) -> int:
    from retina_dist.config import ConfigError
    from retina_dist.infer.predict import predict_files
    from retina_dist.infer.predictor import Predictor

    if (args.left is None) != (args.right is None):
        raise ConfigError("--left and --right go together")
    if not args.inputs and args.left is None:
        raise ConfigError("nothing to predict: give image files, folders or zips (or --left/--right)")
    p = Predictor(args.run, _device(args.device), args.tta)
    if args.left is not None and len(p.views) != 2:
        raise ConfigError(f"--left/--right: the model of {args.run} takes one image, not a pair")
    pairs = (args.left, args.right) if args.left is not None else None
    try:
        s = predict_files(p, args.inputs, Path(args.out), pairs, args.batch, args.cam, not args.no_progress)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"predicted {s.predicted} in {s.seconds:.1f} s ({s.images_per_s:.1f} samples/s) -> {s.out}")
    if s.skipped:
        print(f"skipped {len(s.skipped)} (listed in {Path(s.out).stem}.skipped.csv):", file=sys.stderr)
        for k in s.skipped[:20]:
            print(f"  {k.name}: {k.reason}", file=sys.stderr)
    return 0 if s.predicted or not s.skipped else 1


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from retina_dist.infer.predictor import Predictor
    from retina_dist.serve.app import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can upload images", args.host)
    app = create_app(Predictor(args.run, _device(args.device)), int(args.max_upload_mb * (1 << 20)))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
