"""``retina-dist consolidate``: a run's latest checkpoint (ZeRO or FSDP shards too) as one state dict."""

from __future__ import annotations

import argparse

HELP = "a run's latest checkpoint (ZeRO or FSDP shards too) -> one plain state dict"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the trained run's folder")
    p.add_argument("--out", help="default: <run-dir>/checkpoints/consolidated.pt")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from retina_dist import atomic
    from retina_dist.config import ConfigError
    from retina_dist.run import RunDir
    from retina_dist.run.checkpoints import weights_of

    run_dir = RunDir(args.run_dir)
    path = run_dir.checkpointer().latest(verify=True)
    if path is None:
        raise ConfigError(f"{args.run_dir}: no checkpoint to consolidate")
    out = Path(args.out) if args.out else run_dir.checkpoints / "consolidated.pt"
    atomic.save_torch({"model": weights_of(path)}, out)
    print(out)
    return 0
