"""The one place that knows how processes find each other: torchrun, srun (SLURM) or a lone process.

Nothing else in the package reads RANK / WORLD_SIZE / SLURM_* / MASTER_ADDR.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, e.g. ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank and world from torchrun's variables, else from srun's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR", nodes[0]),
            # One port per job, so two jobs sharing a node do not collide on the rendezvous.
            master_port=int(env.get("MASTER_PORT", 15000 + job % 20000)),
            launcher="slurm",
        )
    return DistEnv()


def slurm_restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(backend: str = "auto", timeout_s: int = 900, single_group: bool = False) -> DistEnv:
    """Join the process group. ``single_group`` makes a one-process group too (DeepSpeed, FSDP need one)."""
    env = discover()
    if not env.distributed and single_group and not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env = DistEnv(master_port=s.getsockname()[1])
        # DeepSpeed reads these itself; a lone process must look like rank 0 of 1.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if (env.distributed or single_group) and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        # torchrun's agent already serves a store on MASTER_PORT (env:// reuses it); srun has none.
        init_method = "env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return env


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class LaggedAgreement:
    """Whether any rank raised a flag, agreed without a blocking collective per step: each ``poll``
    starts a non-blocking MAX all-reduce of this rank's flag and returns the previous poll's result,
    which has long finished. Every rank gets the same answer at the same poll, so all stop at the same
    step boundary, one step after the signal."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: tuple[torch.Tensor, Any] | None = None

    def poll(self, flag: bool) -> bool:
        if not dist.is_initialized():
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        previous, self._pending = self._pending, (t, dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True))
        return self._read(previous)

    def drain(self) -> bool:
        """The outstanding poll's answer (call at a point every rank reaches, e.g. an epoch's end)."""
        previous, self._pending = self._pending, None
        return self._read(previous)

    @staticmethod
    def _read(pending: tuple[torch.Tensor, Any] | None) -> bool:
        if pending is None:
            return False
        t, work = pending
        work.wait()
        return bool(t.item())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running stats) on every rank: the strategies that leave them
    per rank (DeepSpeed, FSDP) call it before an evaluation or a save, so every rank evaluates the
    model the checkpoint holds. (Training uses batch statistics, so doing it only there, rather than
    every step as DDP does, changes nothing.)"""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (one blocking all-reduce)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (one collective, for the end of a pass, not the hot loop)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
