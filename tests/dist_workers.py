"""Functions run inside real 2-process gloo groups (torch.multiprocessing spawns them by name)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from retina_dist import dist

    dist.init("gloo")


def accumulation(rank: int, world: int, port: int, micro: int, accum: int, out: str) -> None:
    """One optimizer step's worth of gradients for 8 samples per rank, split into ``accum`` micro-batches."""
    _join(rank, world, port)
    import timm

    from retina_dist import dist
    from retina_dist.engine.strategy import DDPStrategy
    from retina_dist.engine.train import build_optimizer, warmup_cosine

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=3)  # LayerNorm: no batch-size dependence
    opt = build_optimizer(model, 1e-3, 0.05)
    strategy = DDPStrategy(
        model, opt, warmup_cosine(opt, 1, 10, 0.1), dist.discover(), torch.device("cpu"), "none"
    )
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
    for i in range(accum):
        xs, ys = x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]
        with strategy.accumulating(last=i == accum - 1):
            loss = torch.nn.functional.cross_entropy(strategy.model(xs), ys) / accum
        strategy.backward(loss)
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, out)
    dist.destroy()


def exact_once_eval(rank: int, world: int, port: int, shards: str, workers: int, out: str) -> None:
    _join(rank, world, port)
    from retina_dist import dist
    from retina_dist.engine.evaluate import predict
    from tests.test_distributed import eval_setup

    model, spec, inputs, task = eval_setup(shards)
    preds = predict(model, spec, dist.discover(), inputs, task, workers)
    if rank == 0:
        torch.save(
            {
                "keys": preds.keys,
                "target": torch.from_numpy(preds.target),
                "probs": torch.from_numpy(preds.probs),
            },
            out,
        )
    else:
        assert preds is None
    dist.destroy()


def run(fn, *args, world: int = 2) -> None:
    from tests.conftest import free_port

    torch.multiprocessing.start_processes(
        fn, args=(world, free_port(), *args), nprocs=world, start_method="spawn"
    )


__all__ = ["accumulation", "exact_once_eval", "run", "Path"]


def strategy_steps(
    rank: int, world: int, port: int, strategy: str, stage: int, micro: int, accum: int, steps: int, out: str
) -> None:
    """``steps`` optimizer steps on fixed data (8 samples per rank per step) through a Strategy."""
    _join(rank, world, port)
    import timm

    from retina_dist import dist
    from retina_dist.config import load_config
    from retina_dist.engine.strategy import build_strategy
    from retina_dist.engine.train import build_optimizer, warmup_cosine

    cfg = load_config(
        "synthetic",
        [
            f"train.strategy={strategy}",
            f"deepspeed.zero_stage={stage}",
            f"train.batch_size={micro}",
            f"train.accum_steps={accum}",
            "optim.max_grad_norm=1.0",
        ],
    )
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=3)
    opt = build_optimizer(model, 1e-3, 0.05)
    s = build_strategy(cfg, model, opt, warmup_cosine(opt, 1, 10, 0.1), dist.discover(), torch.device("cpu"))
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
        for i in range(accum):
            with s.accumulating(last=i == accum - 1):
                loss = (
                    torch.nn.functional.cross_entropy(
                        s.model(x[i * micro : (i + 1) * micro]), y[i * micro : (i + 1) * micro]
                    )
                    / accum
                )
            s.backward(loss)
        s.clip_and_step(1.0)
    if rank == 0:
        torch.save({n: p.detach().float().clone() for n, p in s.module.named_parameters()}, out)
    dist.barrier()
    dist.destroy()
    # Once (in 4 CI runs) a DeepSpeed rank aborted in C++ teardown at interpreter exit ("terminate
    # called without an active exception") after its work was done and saved; leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
