"""``retina-dist train``: train (and evaluate) on packed shards."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from retina_dist.commands.common import (
    ONE_NODE,
    Nodes,
    add_run_args,
    config_from,
    nodes_from,
    relaunch_under_torchrun,
)

if TYPE_CHECKING:
    from retina_dist.config import Config

HELP = "train (and evaluate) on packed shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_args(p)


def run(args: argparse.Namespace) -> int:
    return train(config_from(args), args.nproc, nodes_from(args))  # validated before any process starts


def train(cfg: Config, nproc: int, nodes: Nodes = ONE_NODE) -> int:
    from retina_dist.run import RunDir

    _require_shards(cfg)
    resolved = RunDir(cfg.run_dir)
    if (nproc > 1 or nodes.nnodes > 1) and not _is_rank():
        # The ranks read the resolved config from the run folder: one truth for all of them.
        config = str(resolved.write_config(cfg))
        relaunch_under_torchrun(
            nproc,
            ["train", "--preset", config],
            cfg.train.max_restarts,
            nodes,
            "Its last committed checkpoint is whole: run the same command again to resume from it",
        )
        return 0
    from retina_dist.engine.train import EXIT_PREEMPTED
    from retina_dist.engine.train import train as fit

    return EXIT_PREEMPTED if fit(cfg) == "preempted" else 0


def _require_shards(cfg: Config) -> None:
    """A missing shards folder is named here, before any rank starts (``run`` packs it instead)."""
    from pathlib import Path

    from retina_dist.config import ConfigError
    from retina_dist.data import remote
    from retina_dist.data.manifest import MANIFEST

    shards = cfg.data.shards
    if not remote.is_remote(shards) and not (Path(shards) / MANIFEST).exists():
        what = "does not exist" if not Path(shards).exists() else f"holds no {MANIFEST}"
        raise ConfigError(
            f"data.shards={shards} {what}: no manifest to train from; pack it first (retina-dist pack), "
            "index foreign shards (retina-dist index), or use retina-dist run, which packs a preset's "
            "data when it is missing"
        )


def _is_rank() -> bool:
    from retina_dist.dist import discover

    return discover().distributed
