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
    p.add_argument("--shards", help="external validation: another packed dataset (default split: test)")
    p.add_argument("--label-map", help="with --shards: YAML mapping both label sets to common classes")
    p.add_argument("--name", help="with --shards: the external result's name (default: the folder's)")
    add_nproc(p)


def run(args: argparse.Namespace) -> int:
    from retina_dist.config import ConfigError

    if args.label_map and not args.shards:
        raise ConfigError("--label-map maps another dataset's labels: it goes with --shards")
    if args.shards and args.weights:
        raise ConfigError("--shards evaluates the run's latest weights; --weights is for its own shards")
    splits = [a for s in args.split or [] for a in ("--split", s)]
    extra = ["--weights", args.weights] if args.weights else []
    for flag, value in (("--shards", args.shards), ("--label-map", args.label_map), ("--name", args.name)):
        extra += [flag, value] if value else []
    if relaunch_under_torchrun(args.nproc, ["eval", "--run-dir", args.run_dir, *splits, *extra]):
        return 0
    if args.shards:
        from retina_dist.engine.external import evaluate_external

        for split in args.split or ["test"]:
            evaluate_external(args.run_dir, args.shards, args.label_map, split, args.name or "")
        return 0
    from retina_dist.engine.reevaluate import evaluate_run

    evaluate_run(args.run_dir, args.split, args.weights)
    return 0
