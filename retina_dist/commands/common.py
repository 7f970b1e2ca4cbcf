"""What several subcommands share: the run arguments, the config they resolve to, starting local
ranks through torchrun, and packing a preset's data when it is missing. Imports no torch at module
level, so ``launch/submit.py`` can build on the same argument definitions on a login node."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retina_dist.config import Config

log = logging.getLogger("retina_dist")


def add_run_args(p: argparse.ArgumentParser, nproc: bool = True, overrides: bool = True) -> None:
    """--preset, --run-dir, --smoke (and --nproc, KEY=VALUE overrides): how a training is named."""
    p.add_argument("--preset", default="synthetic", help="preset name (retina_dist/presets) or a YAML file")
    p.add_argument("--run-dir", help="run folder (default: the preset's run_dir)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few small images, 2 epochs")
    if nproc:
        add_nproc(p, nodes=True)
    if overrides:
        p.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3"
        )


def add_nproc(p: argparse.ArgumentParser, nodes: bool = False) -> None:
    p.add_argument(
        "--nproc", type=int, default=1, help="local processes to start through torchrun (1: this process)"
    )
    if not nodes:
        return
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job, each started with this command")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    p.add_argument(
        "--rdzv-endpoint",
        default="127.0.0.1:29400",
        help="with --nnodes > 1: HOST:PORT of the c10d rendezvous (on the node started first)",
    )


@dataclass(frozen=True)
class Nodes:
    """Where this launcher's local ranks sit in a multi-node job (one node: the defaults)."""

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str = "127.0.0.1:29400"

    def torchrun_args(self) -> list[str]:
        if self.nnodes <= 1:
            return ["--standalone"]
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id=retina-dist-{self.endpoint}",
        ]


def nodes_from(args: argparse.Namespace) -> Nodes:
    from retina_dist.config import ConfigError

    nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint)
    if nodes.nnodes < 1 or not 0 <= nodes.node_rank < nodes.nnodes:
        raise ConfigError(f"--node-rank {nodes.node_rank} with --nnodes {nodes.nnodes}: expected 0..nnodes-1")
    return nodes


def config_from(args: argparse.Namespace) -> Config:
    from retina_dist.config import load_config

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    return load_config(args.preset, overrides, smoke=args.smoke)


class RanksFailed(RuntimeError):
    """Local ranks started by ``relaunch_under_torchrun`` that died or failed (the message names them)."""


ONE_NODE = Nodes()


def relaunch_under_torchrun(
    nproc: int, argv: list[str], max_restarts: int = 0, nodes: Nodes = ONE_NODE, on_failure: str = ""
) -> bool:
    """With ``nproc`` > 1 and not already one rank of a group: run ``python -m retina_dist <argv>``
    as ``nproc`` local ranks through torch's elastic launcher (as ``torchrun --standalone``) and
    return True once they have finished; otherwise False, and the caller does the work itself.
    A rank that fails ends them all; then the whole group is started again, up to ``max_restarts``
    times, each start resuming from the run's latest checkpoint (a fresh launcher and rendezvous
    each time: torchrun's own in-agent restart of a ``--standalone`` group hangs in this torch, its
    restarted ranks waiting on a store port nothing listens on). ``RanksFailed`` names the ranks and
    how they ended, then ``on_failure`` (what the user can do next)."""
    if nproc <= 1 and nodes.nnodes <= 1:
        return False
    from retina_dist.dist import discover

    if discover().distributed:
        return False
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = [*nodes.torchrun_args(), f"--nproc-per-node={nproc}", "-m", "retina_dist", *argv]
    for attempt in range(max_restarts + 1):
        try:
            run(get_args_parser().parse_args(args))
            return True
        except ChildFailedError as err:
            if attempt == max_restarts:
                restarts = f" after {max_restarts} restart(s)" if max_restarts else ""
                raise RanksFailed(
                    f"{describe_failures(err.failures)}: the job stopped{restarts}, and the other ranks "
                    f"with it.{' ' + on_failure if on_failure else ''}"
                ) from None
            log.warning(
                "%s; starting all %d ranks again (restart %d of %d)",
                describe_failures(err.failures),
                nproc,
                attempt + 1,
                max_restarts,
            )
    return True


def describe_failures(failures: dict) -> str:
    """``rank 1 (local 1, pid 123) was killed by SIGKILL; ...`` for torch's ProcessFailure records."""
    parts = []
    for rank, f in sorted(failures.items()):
        how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
        parts.append(f"rank {rank} (local {f.local_rank}, pid {f.pid}) {how}")
    return "; ".join(parts)


def pack_if_missing(cfg: Config) -> None:
    """Pack the preset's dataset if its shards are missing: from ``data.src`` when given, else from
    the dataset's synthetic twin written in its real layout (no download needed)."""
    from retina_dist.config import ConfigError
    from retina_dist.data import remote
    from retina_dist.data.manifest import MANIFEST
    from retina_dist.data.pack import PackOptions, pack
    from retina_dist.data.sources import SYNTHETIC, build_source
    from retina_dist.data.sources.archive import resolve_src

    d = cfg.data
    out = Path(d.shards)
    if remote.is_remote(d.shards) or (out / MANIFEST).exists():
        return  # a URL base is read as it is, never packed into
    progress = sys.stderr.isatty()
    if d.dataset in SYNTHETIC:
        source = build_source(d.dataset, n=d.n, image_size=d.pack_size, seed=cfg.train.seed)
        pack(source, out, PackOptions(seed=cfg.train.seed), progress=progress)
        return
    from retina_dist.data.synthetic.layouts import synth

    extract = out.with_name(out.name + ".extracted")
    if d.src:
        src = resolve_src(d.src, extract)
        oct_src = resolve_src(d.oct_src, extract) if d.oct_src else None
    else:
        twin = out.with_name(out.name + ".synthetic-src")
        log.warning(
            "data.src is empty: packing a synthetic %s twin (%d samples) written to %s", d.dataset, d.n, twin
        )
        if d.dataset in ("fusion", "fusion_multiclass"):
            src = synth("aptos", twin / "aptos", d.n, d.pack_size, cfg.train.seed)
            oct_src = synth("kermany", twin / "kermany", d.n, d.pack_size, cfg.train.seed)
        else:
            src, oct_src = synth(d.dataset, twin, d.n, d.pack_size, cfg.train.seed), None
    try:
        source = build_source(d.dataset, src=src, oct_src=oct_src, seed=cfg.train.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    pack(source, out, PackOptions(max_side=512, seed=cfg.train.seed), progress=progress)


def device_name(name: str) -> str:
    """``auto``: cuda when there is one, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
