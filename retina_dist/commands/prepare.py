"""``retina-dist prepare``: what a batch script runs once before starting its ranks."""

from __future__ import annotations

import argparse

from retina_dist.commands.common import add_run_args, config_from, pack_if_missing

HELP = (
    "check the config and the shards (packing a synthetic set if needed), then exit: "
    "what a batch script runs once before starting its ranks"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_args(p, nproc=False)


def run(args: argparse.Namespace) -> int:
    from retina_dist.data.manifest import load_manifest, split_shards
    from retina_dist.run import RunDir

    cfg = config_from(args)
    pack_if_missing(cfg)
    manifest = load_manifest(cfg.data.shards)
    for split in {cfg.data.train_split, cfg.data.val_split, *cfg.eval.splits}:
        split_shards(cfg.data.shards, manifest, split)  # a missing split or shard fails here, not on N ranks
    RunDir(cfg.run_dir).create()
    print(cfg.run_dir)
    return 0
