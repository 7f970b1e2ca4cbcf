"""``retina-dist ensemble``: several trained runs of one task as one calibrated ensemble."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retina_dist.commands.common import add_nproc, relaunch_under_torchrun

HELP = "average the calibrated probabilities of runs of one task, exact-once, into a folder of its own"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="the members' run folders")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per run (default: equal)")
    p.add_argument("--split", default="val", help="the split to evaluate (default: val)")
    p.add_argument(
        "--combine", default="probs", choices=("probs", "logits"), help="average probabilities or logits"
    )
    p.add_argument("--out", help="output folder (default: runs/ensemble-<member names>)")
    add_nproc(p)


def run(args: argparse.Namespace) -> int:
    out = args.out or str(Path("runs") / ("ensemble-" + "-".join(Path(r).name for r in args.runs)))
    argv = ["ensemble", "--runs", *args.runs, "--split", args.split, "--combine", args.combine, "--out", out]
    if args.weights:
        argv += ["--weights", *map(str, args.weights)]
    if relaunch_under_torchrun(args.nproc, argv):
        return 0
    from retina_dist.engine.ensemble import evaluate_ensemble

    record = evaluate_ensemble(args.runs, args.split, out, args.weights, args.combine)
    if record:
        print(json.dumps(record["ensemble"]))
    return 0
