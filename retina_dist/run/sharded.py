"""The layout of a checkpoint sharded across ranks by FSDP: a folder with one ``rank-NNNNN.pt`` per
rank (plain tensors: that rank's dim-0 pieces of each parameter and moment, the buffers, the schedule
and the run state) and ``retina_meta.json`` (the world size and each sharded tensor's full shape).

FSDP2 cuts every parameter on dim 0 as ``torch.chunk`` does, in rank order, so the full tensor is the
ranks' pieces concatenated: consolidation needs no process group and no pickle beyond
``weights_only``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from retina_dist import atomic

META = "retina_meta.json"  # the name DeepSpeed checkpoints carry too; ``strategy`` tells them apart
STRATEGY = "fsdp"


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def write_rank(folder: Path, rank: int, state: dict[str, Any]) -> Path:
    from retina_dist.run.checkpoints import save_file

    folder.mkdir(parents=True, exist_ok=True)
    return save_file(state, rank_file(folder, rank))


def write_meta(folder: Path, world_size: int, shapes: dict[str, list[int]]) -> None:
    atomic.write_json(folder / META, {"strategy": STRATEGY, "world_size": world_size, "shapes": shapes})


def read_meta(folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((folder / META).read_text())
    return meta


def is_sharded(folder: Path) -> bool:
    return (folder / META).is_file() and read_meta(folder).get("strategy") == STRATEGY


def _rank_states(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from retina_dist.run.checkpoints import load

    meta = read_meta(folder)
    files = [rank_file(folder, r) for r in range(meta["world_size"])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: a checkpoint of {meta['world_size']} ranks lacks {missing}")
    return meta, [load(f) for f in files]


def _piece(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """What FSDP2 gives ``rank`` of ``world`` of a tensor: its ``torch.chunk`` on dim 0, or no rows."""
    chunks = full.chunk(world, dim=0)
    return chunks[rank].clone() if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))


def reshard(folder: Path, rank: int, world: int) -> dict[str, Any]:
    """A checkpoint saved by one number of ranks as ``rank``'s state on ``world`` ranks: every
    sharded weight and optimizer moment joined and cut again (the run state, the schedule and the
    buffers from rank 0's file). Each rank reads all the files once, so it briefly holds the full
    state in host memory."""
    meta, states = _rank_states(folder)
    out = dict(states[0])
    out["model"] = {
        k: _piece(torch.cat([s["model"][k] for s in states]), rank, world) if k in meta["shapes"] else v
        for k, v in states[0]["model"].items()
    }
    moments: dict[Any, dict[str, Any]] = {}
    for i, first in states[0]["optimizer"]["state"].items():
        moments[i] = {
            k: _piece(torch.cat([s["optimizer"]["state"][i][k] for s in states]), rank, world)
            if torch.is_tensor(v) and v.dim() > 0
            else v
            for k, v in first.items()
        }
    out["optimizer"] = {**states[0]["optimizer"], "state": moments}
    return out


def consolidate(folder: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint folder."""
    meta, states = _rank_states(folder)
    parts = [s["model"] for s in states]
    full: dict[str, torch.Tensor] = {}
    for key, first in parts[0].items():
        shape = meta["shapes"].get(key)
        if shape is None:  # a buffer: whole on every rank (rank 0's is the one saved runs share)
            full[key] = first
            continue
        joined = torch.cat([p[key] for p in parts], dim=0) if len(shape) else first
        if list(joined.shape) != shape:
            raise ValueError(f"{folder}: {key} joins to {list(joined.shape)}, not the saved {shape}")
        full[key] = joined
    return full
