"""``retina-dist export``: TorchScript or ONNX with preprocessing and calibration inside, + model card."""

from __future__ import annotations

import argparse
import json

HELP = "TorchScript or ONNX with preprocessing and calibration inside, + model card"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (runs/<name>)")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="onnx", help="what to write")
    p.add_argument("--out", help="output file (default: <run>/export/model.{pt,onnx})")


def run(args: argparse.Namespace) -> int:
    from retina_dist.infer.export import export

    print(json.dumps(export(args.run, args.format, args.out), indent=1))
    return 0
