"""``retina-dist eval``: a later exact-once evaluation of a trained run, written apart from its training."""

from __future__ import annotations

import argparse

from retina_dist.commands.common import add_nproc, relaunch_under_torchrun

HELP = "exact-once evaluation of a trained run (written under <run>/evals/, never over the training's)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the trained run's folder")
    p.add_argument(
        "--split", action="append", help="split to evaluate, repeatable (default: the run's eval.splits)"
    )
    p.add_argument("--weights", help="evaluate this plain state dict (e.g. from consolidate) instead")
    add_nproc(p)


def run(args: argparse.Namespace) -> int:
    splits = [a for s in args.split or [] for a in ("--split", s)]
    weights = ["--weights", args.weights] if args.weights else []
    if relaunch_under_torchrun(args.nproc, ["eval", "--run-dir", args.run_dir, *splits, *weights]):
        return 0
    from retina_dist.engine.reevaluate import evaluate_run

    evaluate_run(args.run_dir, args.split, args.weights)
    return 0
