"""DeepSpeed ZeRO 0/1/2 behind the same Strategy interface as DDP. The only module driving a DeepSpeed
engine (run/checkpoints.py reads its checkpoint format).

The DeepSpeed JSON is generated from the run config (never kept by hand beside it): micro-batch,
accumulation and clipping come from ``train``/``optim``, ``train_batch_size`` is derived as
micro x accum x world. The train step already divides the loss by the accumulation count, so
``backward`` tells DeepSpeed not to divide it again.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retina_dist.dist import DistEnv, broadcast_buffers
from retina_dist.engine.strategy import FiniteWatch
from retina_dist.run.checkpoints import ResumeError, load_deepspeed

META = "retina_meta.json"


def deepspeed_config(
    micro: int, accum: int, world: int, max_norm: float, amp: str, stage: int
) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": max_norm,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": amp == "bf16"},
        "fp16": {"enabled": amp == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _weights_only_engine(engine: Any) -> Any:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_deepspeed(path, map_location)

    return WeightsOnlyCheckpointEngine(engine._config)


class DeepSpeedStrategy:
    sharded_forward = False  # ZeRO 0-2 keep the whole module on every rank
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        env: DistEnv,
        device: torch.device,
        amp: str,
        micro: int,
        accum: int,
        max_norm: float,
        stage: int,
    ) -> None:
        import deepspeed

        self.config = deepspeed_config(micro, accum, env.world_size, max_norm, amp, stage)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        # DeepSpeed's own loader unpickles anything; its files are read weights_only instead.
        self.engine.checkpoint_engine = _weights_only_engine(self.engine)
        self.model = self.engine
        self.module: nn.Module = self.engine.module
        self.env = env
        self.finite = FiniteWatch()
        self.input_dtype = torch.bfloat16 if amp == "bf16" else torch.float16 if amp == "fp16" else None

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        # Set before the forward: ZeRO-2's reduction hooks read the boundary during backward.
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed counts micro-steps; it updates only at the boundary

    def sync_buffers(self) -> None:
        broadcast_buffers(self.module)  # DeepSpeed leaves BatchNorm's running stats per rank

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # ZeRO stage 0 with a client optimizer does not report it
            return torch.tensor(float("nan"))
        norm = torch.tensor(float(norm))
        if self.input_dtype is not torch.float16:  # fp16 overflow steps are skipped by its loss scaler
            self.finite.record(norm)
        return norm

    def check_finite(self) -> None:
        self.finite.check()

    def state_dict(self) -> dict[str, Any]:
        """This rank's view: the full module, this rank's ZeRO partition of the optimizer (stages 1-2
        partition it, so a state dict is per rank, as ``save`` writes it), the schedule."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` gave on the same rank of the same world size."""
        self.module.load_state_dict(state["model"])
        if self.config["zero_optimization"]["stage"] > 0:
            # DeepSpeed reads entry [dp_rank] of a per-rank list; the fp32 master partition is the truth.
            self.optimizer.load_state_dict(
                [state["optimizer"]] * self.env.world_size, load_from_fp32_weights=True
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, folder: Path, name: str, extra: dict[str, Any]) -> Path:
        """Every rank writes its ZeRO partition into ``folder/name/``; returns that folder."""
        self.engine.save_checkpoint(str(folder), tag=name, client_state=extra, save_latest=False)
        if self.env.is_main:
            (folder / name / META).write_text(json.dumps({"world_size": self.env.world_size}))
        return folder / name

    def load(self, path: Path) -> dict[str, Any]:
        saved = json.loads((path / META).read_text())["world_size"]
        if saved != self.env.world_size:
            raise ResumeError(
                f"{path}: a ZeRO checkpoint of {saved} ranks cannot be resumed on {self.env.world_size}; "
                f"resume with {saved} ranks, or consolidate it (retina-dist consolidate) and start a new run "
                "from the weights with model.pretrained=…"
            )
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        return client
