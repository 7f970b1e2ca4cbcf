"""How a model is wrapped, stepped and saved across processes. The engine talks only to a Strategy."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from retina_dist.config import Config
from retina_dist.dist import DistEnv
from retina_dist.run.checkpoints import cpu_copy, load, save_file


class NonFiniteError(FloatingPointError):
    pass


class Strategy(Protocol):
    """How a model is wrapped, stepped and saved across processes (DDP, DeepSpeed, FSDP)."""

    model: nn.Module  # what the forward goes through (a DDP wrapper, a DeepSpeed engine)
    module: nn.Module  # the model inside (with FSDP, itself sharded: its forward is collective)
    optimizer: Any
    scheduler: Any
    # A forward of ``module`` is a collective (its weights are gathered from the ranks): every rank
    # must run as many, so evaluation goes in lockstep.
    sharded_forward: bool

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager[None]: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def clip_and_step(self, max_norm: float) -> torch.Tensor: ...
    def check_finite(self) -> None: ...
    def sync_buffers(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def save(self, folder: Path, name: str, extra: dict[str, Any]) -> Path: ...
    def load(self, path: Path) -> dict[str, Any]: ...


class FiniteWatch:
    """Non-finite gradient norms are recorded on the device and read back only when asked (at
    log steps and before every save), so a step never waits on the device for the check. A run
    that diverged therefore stops within ``log_every`` steps, before any checkpoint holds it."""

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None
        self._first_step = 0
        self._steps = 0

    def record(self, norm: torch.Tensor) -> None:
        self._steps += 1
        bad = ~torch.isfinite(norm.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def check(self) -> None:
        if self._bad is not None and bool(self._bad):
            raise NonFiniteError(
                f"gradient norm became non-finite within the last {self._steps} steps: the loss diverged "
                "(try a lower lr or amp=none); no checkpoint was written after it"
            )
        self._bad, self._steps = None, 0


class DDPStrategy:
    """Plain DDP (or a lone process): ``no_sync`` on all but the last micro-step, optional GradScaler."""

    sharded_forward = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        env: DistEnv,
        device: torch.device,
        amp: str,
    ) -> None:
        self.module = model.to(device)
        self.model: nn.Module = (
            DDP(self.module, device_ids=[device.index] if device.type == "cuda" else None)
            if env.distributed
            else self.module
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.env = env
        self.finite = FiniteWatch()

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        sync = last or not isinstance(self.model, DDP)
        with contextlib.nullcontext() if sync else self.model.no_sync():  # type: ignore[operator]
            yield

    def sync_buffers(self) -> None:
        """Nothing to do: DDP broadcasts rank 0's buffers at every forward."""

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Unscale, clip, step, zero the grads, advance the schedule; returns the pre-clip grad norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if self.scaler:  # overflow steps are skipped by the scaler, by design
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.finite.record(norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def check_finite(self) -> None:
        self.finite.check()

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def save(self, folder: Path, name: str, extra: dict[str, Any]) -> Path:
        """Rank 0 writes one file (DDP replicas are identical); returns its path on every rank."""
        path = folder / f"{name}.pt"
        if self.env.is_main:
            save_file({**self.state_dict(), **extra}, path)
        return path

    def snapshot(self, folder: Path, name: str, extra: dict[str, Any]) -> Callable[[], Path] | None:
        """``save`` in two halves: the state copied to CPU now (all a step waits for) and the write
        of that copy, returned to be run later, on another thread (rank 0; None on the others)."""
        if not self.env.is_main:
            return None
        state = cpu_copy({**self.state_dict(), **extra})
        path = folder / f"{name}.pt"
        return lambda: save_file(state, path)

    def load(self, path: Path) -> dict[str, Any]:
        state = load(path)
        self.load_state_dict(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_strategy(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    env: DistEnv,
    device: torch.device,
) -> Strategy:
    t = cfg.train
    if t.strategy == "ddp":
        return DDPStrategy(model, optimizer, scheduler, env, device, t.amp)
    if t.strategy == "deepspeed":
        from retina_dist.engine.deepspeed_strategy import DeepSpeedStrategy

        return DeepSpeedStrategy(
            model,
            optimizer,
            scheduler,
            env,
            device,
            t.amp,
            t.batch_size,
            t.accum_steps,
            cfg.optim.max_grad_norm,
            cfg.deepspeed.zero_stage,
        )
    if t.strategy == "fsdp":
        from retina_dist.engine.fsdp_strategy import FSDPStrategy

        return FSDPStrategy(model, optimizer, scheduler, env, device, t.amp)
    raise ValueError(f"unknown strategy {t.strategy!r}")
