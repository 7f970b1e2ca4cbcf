"""``retina-dist export``: TorchScript or ONNX with preprocessing and calibration inside, + model card."""

from __future__ import annotations

import argparse
import json

HELP = "TorchScript or ONNX with preprocessing and calibration inside, + model card"


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run folder (runs/<name>)")
    which.add_argument(
        "--ensemble", help="an ensemble's folder (retina-dist ensemble --out): all members in one file"
    )
    p.add_argument("--format", choices=("torchscript", "onnx"), default="onnx", help="what to write")
    p.add_argument("--out", help="output file (default: <run or ensemble>/export/model.{pt,onnx})")


def run(args: argparse.Namespace) -> int:
    from retina_dist.infer.export import export, export_ensemble

    if args.ensemble:
        print(json.dumps(export_ensemble(args.ensemble, args.format, args.out), indent=1))
    else:
        print(json.dumps(export(args.run, args.format, args.out), indent=1))
    return 0
