"""``retina-dist synth``: synthetic images written in a real dataset's on-disk layout."""

from __future__ import annotations

import argparse

HELP = "write synthetic images in a real dataset's on-disk layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="aptos | kermany | octmnist | odir | rfmid")
    p.add_argument("--out", required=True, help="folder to write the layout into")
    p.add_argument("--n", type=int, default=40, help="samples (patients for odir)")
    p.add_argument(
        "--size", type=int, default=64, help="base image height in pixels (octmnist: 28/64/128/224)"
    )
    p.add_argument("--version", help="layout version (default: the first listed for the dataset)")
    p.add_argument("--columns", type=int, default=47, choices=(47, 30), help="rfmid: label CSV columns")
    p.add_argument("--archive", choices=("zip", "tar.gz"), help="also pack the tree as a downloaded archive")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and labels")


def run(args: argparse.Namespace) -> int:
    from retina_dist.data.synthetic.layouts import synth

    print(
        synth(args.dataset, args.out, args.n, args.size, args.seed, args.version, args.archive, args.columns)
    )
    return 0
