"""PyTorch FSDP2 (``fully_shard``) behind the same Strategy interface and train step as DDP: weights,
gradients and AdamW moments are sharded across the ranks (ZeRO-3's partitioning), for backbones whose
full replicas do not fit beside their optimizer state.

Each block of the backbone (timm's ``blocks``, ConvNeXt's stage blocks, ResNet's ``layerN`` blocks)
is one unit: its weights are all-gathered just before its forward and its backward and freed after,
so a rank holds its shard of everything and the full weights of one block at a time. The root
holds what is left (stem, norm, head).

Checkpoints are folders of one file per rank (``run/sharded.py`` owns the layout): each rank writes
only its own shards, as plain tensors a ``weights_only`` load reads, and ``consolidate`` joins them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from retina_dist.dist import DistEnv, broadcast_buffers
from retina_dist.engine.strategy import FiniteWatch
from retina_dist.run import sharded
from retina_dist.run.checkpoints import ResumeError, load

UNIT_CONTAINER = re.compile(r"(^|\.)(blocks|layer\d+)$")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units, innermost first (FSDP2 wants children sharded before parents)."""
    units = [
        child
        for name, container in model.named_modules()
        if UNIT_CONTAINER.search(name) and isinstance(container, nn.Sequential | nn.ModuleList)
        for child in container.children()
        if any(p.requires_grad for p in child.parameters())
    ]
    return units[::-1]


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


class FSDPStrategy:
    sharded_forward = True
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        env: DistEnv,
        device: torch.device,
        amp: str,
    ) -> None:
        if amp == "fp16":
            raise ValueError("train.strategy=fsdp takes amp=bf16 or none (fp16 needs a sharded grad scaler)")
        names = {id(p): n for n, p in model.named_parameters()}
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if amp == "bf16" else None, reduce_dtype=torch.float32
        )
        # The model stays where it was built: fully_shard moves each unit to the mesh's device as it
        # shards it, so a GPU never holds more than one unit's full weights beside the shards.
        mesh = init_device_mesh(device.type, (env.world_size,))
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        model.to(device)  # anything no unit manages (none in timm's models)
        # fully_shard swaps every parameter for a sharded DTensor one; the optimizer (built with its
        # per-parameter groups before) is pointed at the new parameters, by name, while it holds no state.
        if optimizer.state:
            raise ValueError("FSDPStrategy takes an optimizer that has not stepped yet")
        by_name = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [by_name[names[id(p)]] for p in group["params"]]
        self.module: nn.Module = model
        self.model = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.env = env
        self.finite = FiniteWatch()

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        # Off: gradients accumulate unsharded and are reduce-scattered once, at the last micro-step.
        assert isinstance(self.module, FSDPModule)
        self.module.set_requires_gradient_sync(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        self.finite.record(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def check_finite(self) -> None:
        self.finite.check()

    def sync_buffers(self) -> None:
        broadcast_buffers(self.module)  # FSDP shards parameters only: buffers stay per rank

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards as plain tensors (parameters, AdamW moments), the buffers, the schedule."""
        optim = self.optimizer.state_dict()
        return {
            "model": {k: _local(v) for k, v in self.module.state_dict().items()},
            "optimizer": {
                "state": {i: {k: _local(v) for k, v in s.items()} for i, s in optim["state"].items()},
                "param_groups": optim["param_groups"],
            },
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` gave on the same rank of the same world size."""
        current = self.module.state_dict()
        if current.keys() != state["model"].keys():
            missing = sorted(current.keys() - state["model"].keys())[:3]
            extra = sorted(state["model"].keys() - current.keys())[:3]
            raise ResumeError(
                f"the saved model does not match this one: missing {missing}, unexpected {extra}"
            )
        with torch.no_grad():
            for k, v in state["model"].items():
                _local(current[k]).copy_(v)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        optim = {
            "state": {
                i: {k: self._reshard(v, params[int(i)]) for k, v in s.items()}
                for i, s in state["optimizer"]["state"].items()
            },
            "param_groups": state["optimizer"]["param_groups"],
        }
        self.optimizer.load_state_dict(optim)
        self.scheduler.load_state_dict(state["scheduler"])

    @staticmethod
    def _reshard(value: Any, param: torch.Tensor) -> Any:
        """A saved moment as the DTensor its parameter is (the step count stays a plain scalar)."""
        if not isinstance(param, DTensor) or not torch.is_tensor(value) or value.dim() == 0:
            return value
        return DTensor.from_local(
            value.to(param.device), param.device_mesh, param.placements,
            shape=param.shape, stride=param.stride(), run_check=False,
        )

    def save(self, folder: Path, name: str, extra: dict[str, Any]) -> Path:
        """Every rank writes its shards into ``folder/name/``; returns that folder."""
        path = folder / name
        sharded.write_rank(path, self.env.rank, {**self.state_dict(), **extra})
        if self.env.is_main:
            shapes = {k: list(v.shape) for k, v in self.module.state_dict().items() if isinstance(v, DTensor)}
            sharded.write_meta(path, self.env.world_size, shapes)
        return path

    def load(self, path: Path) -> dict[str, Any]:
        """This rank's shards; a checkpoint of another world size is cut anew for this one."""
        saved = sharded.read_meta(path)["world_size"]
        if saved == self.env.world_size:
            state = load(sharded.rank_file(path, self.env.rank))
        else:
            state = sharded.reshard(path, self.env.rank, self.env.world_size)
        self.load_state_dict(state)
        return state
