"""``retina-dist run``: pack (if needed) -> train -> evaluate -> figures -> the CAM pass."""

from __future__ import annotations

import argparse

from retina_dist.commands import cam
from retina_dist.commands.common import add_run_args, config_from, nodes_from, pack_if_missing
from retina_dist.commands.train import train

HELP = "pack (if needed) -> train -> evaluate -> figures -> CAM overlays"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_args(p)


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    pack_if_missing(cfg)
    code = train(cfg, args.nproc, nodes_from(args))
    if code or not cfg.cam.enabled:
        return code
    c = cfg.cam
    return cam.cam(cfg.run_dir, c.split, c.method, c.select, c.limit, c.target_layer, args.nproc)
