"""``retina-dist cam``: class activation maps for a trained run, exact-once across ranks."""

from __future__ import annotations

import argparse

from retina_dist.commands.common import add_nproc, relaunch_under_torchrun

HELP = "class activation maps for a run, exact-once across ranks, scored on lesions"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the trained run's folder")
    p.add_argument("--split", help="default: the run's cam.split (val)")
    p.add_argument(
        "--method",
        help="gradcam | gradcam++ | xgradcam | layercam | eigencam | "
        "ig (Integrated Gradients) | rollout (ViT attention)",
    )
    p.add_argument("--select", help="all | errors | correct | per-class:K")
    p.add_argument("--limit", type=int, help="at most N samples (0: all)")
    p.add_argument("--target-layer", help="module path to explain instead of the family's default")
    add_nproc(p)


def run(args: argparse.Namespace) -> int:
    from retina_dist.run import RunDir

    c = RunDir(args.run_dir).read_config().cam
    return cam(
        args.run_dir,
        args.split or c.split,
        args.method or c.method,
        args.select or c.select,
        c.limit if args.limit is None else args.limit,
        c.target_layer if args.target_layer is None else args.target_layer,
        args.nproc,
    )


def cam(run_dir: str, split: str, method: str, select: str, limit: int, layer: str, nproc: int) -> int:
    argv = ["cam", "--run-dir", run_dir, "--split", split, "--method", method, "--select", select]
    if relaunch_under_torchrun(nproc, [*argv, "--limit", str(limit), "--target-layer", layer]):
        return 0
    from retina_dist.cam.runner import run_cam

    run_cam(run_dir, split, method, limit, select, layer)
    return 0
