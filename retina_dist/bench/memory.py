"""bench step --strategies: what one rank holds to train a large backbone under each strategy (DDP,
DeepSpeed ZeRO-1/2, FSDP2), measured on the same model, batch and data, 2 ranks (gloo on CPU, the
GPUs where there are some), each strategy in its own fresh processes.

Per rank: the peak it reached (GPU: ``max_memory_allocated``; CPU: peak RSS above the process's own
before the model was built) and the model state it keeps between steps (its weights, gradients and
optimizer moments, counted tensor by tensor: a replica's full size under DDP, a share under ZeRO and
FSDP).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch

from retina_dist.bench.common import spawn_ranks, table

STRATEGIES: dict[str, tuple[str, int]] = {
    "ddp": ("ddp", 0),
    "zero1": ("deepspeed", 1),
    "zero2": ("deepspeed", 2),
    "fsdp": ("fsdp", 0),
}
MIB = 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among ``tensors`` (local shards of sharded ones)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def held_state_mib(strategy: Any) -> float:
    """Weights, gradients and optimizer state this rank keeps after a step, in MiB. DeepSpeed's
    ZeRO optimizer keeps its fp32 partitions and flat gradient buffers apart from the module: they
    are counted from the wrapped optimizer."""
    opt = strategy.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizer wraps torch's
    tensors: list[Any] = []
    for p in strategy.module.parameters():
        tensors += [p, p.grad]
    for state in inner.state.values():
        tensors += list(state.values())
    for name in ("single_partition_of_fp32_groups", "averaged_gradients", "ipg_buffer"):
        value = getattr(opt, name, None)
        if isinstance(value, dict):
            value = [t for ts in value.values() for t in (ts if isinstance(ts, list) else [ts])]
        tensors += list(value or [])
    for group in getattr(opt, "bit16_groups_flat", []) or []:
        tensors.append(group)
    return _bytes(tensors) / MIB


def _rank(
    rank: int, world: int, port: int, name: str, model_name: str, image_size: int, batch: int, steps: int,
    amp: str, out: Any,
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from retina_dist import dist
    from retina_dist.config import Config
    from retina_dist.data.stream.feeder import DeviceInputs
    from retina_dist.engine.optim import build_optimizer, warmup_cosine
    from retina_dist.engine.step import TrainStep
    from retina_dist.engine.strategy import build_strategy
    from retina_dist.models.backbone import create
    from retina_dist.tasks import Task

    env = dist.init("auto")
    device = dist.device_for(env)
    try:
        cfg = Config()
        cfg.train.strategy, cfg.deepspeed.zero_stage = STRATEGIES[name]
        cfg.train.batch_size, cfg.train.amp = batch, amp
        before = _peak_rss_mib()
        torch.manual_seed(0)
        model = create(model_name, 5, 3, img_size=image_size)
        params = sum(p.numel() for p in model.parameters())
        opt = build_optimizer(model, 1e-4, 0.05)
        strategy = build_strategy(cfg, model, opt, warmup_cosine(opt, 1, 10**6, 0.01), env, device)
        del model, opt
        inputs = DeviceInputs(cfg.data.mean, cfg.data.std, 3, device, False)
        task = Task("multiclass", tuple("abcde"))
        train_step = TrainStep(strategy, task.loss, 1, amp, 1.0)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 5, (batch,), generator=g)
        strategy.model.train()
        train_step([inputs({"image": x, "target": y})])  # the optimizer state exists from here
        started = time.perf_counter()
        for _ in range(steps):
            train_step([inputs({"image": x, "target": y})])
        dist.barrier()
        step_s = (time.perf_counter() - started) / steps
        held = held_state_mib(strategy)
        peak = (
            torch.cuda.max_memory_allocated(device) / MIB
            if device.type == "cuda"
            else _peak_rss_mib() - before
        )
        out.put((rank, {"peak_mib": peak, "held_state_mib": held, "step_s": step_s, "params": params}))
    finally:
        dist.destroy()


def measure(
    name: str, model_name: str, image_size: int, batch: int, steps: int, amp: str = "none", world: int = 2
) -> list[dict[str, float]]:
    """Each rank's figures for one strategy, from ``world`` fresh spawned processes."""
    return spawn_ranks(_rank, world, name, model_name, image_size, batch, steps, amp)


def run(
    strategies: list[str], model_name: str, image_size: int, batch: int, steps: int, amp: str = "none"
) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict[str, Any]] = []
    for name in strategies:
        ranks = measure(name, model_name, image_size, batch, steps, amp)
        rows.append(
            {
                "strategy": name,
                "peak_mib_per_rank": max(r["peak_mib"] for r in ranks),
                "held_state_mib_per_rank": max(r["held_state_mib"] for r in ranks),
                "step_s": max(r["step_s"] for r in ranks),
                "params_m": ranks[0]["params"] / 1e6,
            }
        )
    base = next((r for r in rows if r["strategy"] == "ddp"), None)
    for r in rows:
        if base is not None:
            r["peak_over_ddp"] = r["peak_mib_per_rank"] / base["peak_mib_per_rank"]
            r["held_over_ddp"] = r["held_state_mib_per_rank"] / base["held_state_mib_per_rank"]
    peak = "peak MiB/rank (GPU allocated)" if device == "cuda" else "peak MiB/rank (RSS growth)"
    print(
        table(
            f"memory per rank: {model_name} ({rows[0]['params_m']:.0f}M params) {image_size} px, batch "
            f"{batch}/rank, 2 ranks on {device}, amp {amp}, AdamW",
            ["strategy", peak, "held state MiB/rank", "÷ DDP", "step s"],
            [
                [
                    r["strategy"],
                    r["peak_mib_per_rank"],
                    r["held_state_mib_per_rank"],
                    f"{r.get('held_over_ddp', float('nan')):.2f}",
                    f"{r['step_s']:.2f}",
                ]
                for r in rows
            ],
        )
    )
    return {"model": model_name, "image_size": image_size, "batch": batch, "device": device, "rows": rows}
