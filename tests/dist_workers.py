"""Functions run inside real 2-process gloo groups (torch.multiprocessing spawns them by name)."""

from __future__ import annotations

import copy
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
    from retina_dist.engine.optim import build_optimizer, warmup_cosine
    from retina_dist.engine.step import TrainStep
    from retina_dist.engine.strategy import DDPStrategy

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=3)  # LayerNorm: no batch-size dependence
    opt = build_optimizer(model, 1e-3, 0.05)
    strategy = DDPStrategy(
        model, opt, warmup_cosine(opt, 1, 10, 0.1), dist.discover(), torch.device("cpu"), "none"
    )
    grads: dict[str, torch.Tensor] = {}
    named = list(model.named_parameters())
    # The step zeroes the grads after the update: keep them as the optimizer saw them (reduced).
    opt.register_step_pre_hook(lambda *_: grads.update({n: p.grad.clone() for n, p in named}))
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
    step = TrainStep(strategy, torch.nn.functional.cross_entropy, accum, max_grad_norm=0.0)
    out_step = step((x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]) for i in range(accum))
    assert out_step.samples == 8
    if rank == 0:
        params = {n: p.detach().clone() for n, p in named}
        torch.save({"grads": grads, "params": params, "loss": out_step.loss.clone()}, out)
    dist.destroy()


def exact_once_eval(rank: int, world: int, port: int, shards: str, workers: int, out: str) -> None:
    _join(rank, world, port)
    from retina_dist import dist
    from retina_dist.engine.evaluate import Evaluator
    from tests.test_distributed import eval_setup

    model, spec, inputs, task = eval_setup(shards)
    preds = Evaluator(model, dist.discover(), inputs, task, workers).predict(spec)
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


def _full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (FSDP's sharded ones all-gathered), as fp32 copies."""
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
        for n, p in module.named_parameters()
    }


def strategy_steps(
    rank: int, world: int, port: int, strategy: str, stage: int, micro: int, accum: int, steps: int, out: str
) -> None:
    """``steps`` optimizer steps on fixed data (8 samples per rank per step) through a Strategy."""
    _join(rank, world, port)
    import timm

    from retina_dist import dist
    from retina_dist.config import load_config
    from retina_dist.engine.optim import build_optimizer, warmup_cosine
    from retina_dist.engine.step import TrainStep
    from retina_dist.engine.strategy import build_strategy

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
    train_step = TrainStep(s, torch.nn.functional.cross_entropy, accum, max_grad_norm=1.0)
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
        train_step((x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro]) for i in range(accum))
    s.check_finite()
    params = _full_params(s.module)  # collective under FSDP: every rank joins
    if rank == 0:
        torch.save(params, out)
    dist.barrier()
    dist.destroy()
    # Once (in 4 CI runs) a DeepSpeed rank aborted in C++ teardown at interpreter exit ("terminate
    # called without an active exception") after its work was done and saved; leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def strategy_params(out: Path, *args: object) -> dict[str, torch.Tensor]:
    """The parameters ``strategy_steps`` reaches, by way of ``out``."""
    run(strategy_steps, *args, str(out))
    return torch.load(out)


def strategy_roundtrip(rank: int, world: int, port: int, strategy: str, stage: int, out: str) -> None:
    """Two steps, then the Strategy's state_dict into a second strategy built from another init;
    one more step on each with the same data: both must land on the same parameters."""
    _join(rank, world, port)
    import timm
    from torch.utils._pytree import tree_map

    from retina_dist import dist
    from retina_dist.config import load_config
    from retina_dist.engine.optim import build_optimizer, warmup_cosine
    from retina_dist.engine.step import TrainStep
    from retina_dist.engine.strategy import build_strategy

    cfg = load_config(
        "synthetic",
        [f"train.strategy={strategy}", f"deepspeed.zero_stage={stage}", "train.batch_size=8"],
    )

    def build(seed: int):
        torch.manual_seed(seed)
        model = timm.create_model("convnext_atto", num_classes=3)
        opt = build_optimizer(model, 1e-3, 0.05)
        s = build_strategy(
            cfg, model, opt, warmup_cosine(opt, 1, 10, 0.1), dist.discover(), torch.device("cpu")
        )
        return s, TrainStep(s, torch.nn.functional.cross_entropy, 1, max_grad_norm=1.0)

    def data(step: int):
        g = torch.Generator().manual_seed(1000 * step + rank)
        return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g))]

    a, step_a = build(0)
    for i in range(2):
        step_a(data(i))
    b, step_b = build(1)
    # A copy, as a checkpoint file would hold: torch's optimizers adopt the given state tensors.
    b.load_state_dict(
        tree_map(lambda v: v.detach().clone() if torch.is_tensor(v) else copy.copy(v), a.state_dict())
    )
    step_a(data(2))
    step_b(data(2))
    params_a, params_b = _full_params(a.module), _full_params(b.module)
    if rank == 0:
        torch.save(
            {
                "a": params_a,
                "b": params_b,
                "lr": (a.scheduler.get_last_lr(), b.scheduler.get_last_lr()),
            },
            out,
        )
    dist.barrier()
    dist.destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fsdp_reshard(rank: int, world: int, port: int, folder: str, phase: str, out: str) -> None:
    """``save``: two FSDP steps, the checkpoint written to ``folder``; ``load``: a strategy built from
    another init loads it (on whatever world size this group has). Either way the full weights and
    AdamW moments, all-gathered, go to ``out`` from rank 0."""
    _join(rank, world, port)
    import timm
    from torch.distributed.tensor import DTensor

    from retina_dist import dist
    from retina_dist.engine.fsdp_strategy import FSDPStrategy
    from retina_dist.engine.optim import build_optimizer, warmup_cosine
    from retina_dist.engine.step import TrainStep

    torch.manual_seed(0 if phase == "save" else 1)
    model = timm.create_model("convnext_atto", num_classes=3)
    opt = build_optimizer(model, 1e-3, 0.05)
    s = FSDPStrategy(model, opt, warmup_cosine(opt, 1, 10, 0.1), dist.discover(), torch.device("cpu"), "none")
    if phase == "save":
        step = TrainStep(s, torch.nn.functional.cross_entropy, 1, max_grad_norm=1.0)
        for i in range(2):
            g = torch.Generator().manual_seed(1000 * i + rank)
            step([(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g))])
        s.save(Path(folder).parent, Path(folder).name, {"note": "extra"})
        extra = "extra"
    else:
        extra = s.load(Path(folder))["note"]
    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
    names = {p: n for n, p in s.module.named_parameters()}
    moments = {
        f"{names[p]}.{k}": full(v)
        for p, st in s.optimizer.state.items()
        for k, v in st.items()
        if k != "step"
    }
    got = {"params": _full_params(s.module), "moments": moments, "extra": extra}
    got["lr"] = s.scheduler.get_last_lr()
    if rank == 0:
        torch.save(got, out)
    dist.barrier()
    dist.destroy()
