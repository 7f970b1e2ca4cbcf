"""bench step: the toolkit's train step (``engine.step.TrainStep``: uint8 -> device normalisation,
autocast, loss from the task, strategy backward, clip + on-device non-finite record + step + schedule)
vs a bare model/loss/backward/step loop on the same model, batch and device; and 2 gloo ranks vs 1."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retina_dist.bench.common import spawn_ranks, table
from retina_dist.config import Config
from retina_dist.data.stream.feeder import DeviceInputs
from retina_dist.dist import DistEnv
from retina_dist.engine.optim import build_optimizer, warmup_cosine
from retina_dist.engine.step import TrainStep
from retina_dist.engine.strategy import DDPStrategy
from retina_dist.models.backbone import create
from retina_dist.tasks import Task


def _setup(
    model_name: str,
    image_size: int,
    batch: int,
    channels_last: bool = False,
    compile_: bool = False,
    seed: int = 0,
    grad_ckpt: bool = False,
):
    torch.manual_seed(seed)
    classes = 5
    # img_size: a ViT at another size than its name's gets its patch grid (and pos_embed) for it.
    model = create(model_name, classes, 3, grad_ckpt=grad_ckpt, img_size=image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model.compile()  # the same in-place compile as models.build_model
    x = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    y = torch.randint(0, classes, (batch,))
    return model, x, y


def _timed(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def bare(
    model_name: str,
    image_size: int,
    batch: int,
    steps: int,
    device: torch.device,
    channels_last: bool = False,
    compile_: bool = False,
) -> float:
    model, x, y = _setup(model_name, image_size, batch, channels_last, compile_)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xf, y = (x.float() / 255).to(device).contiguous(memory_format=fmt), y.to(device)

    def step() -> None:
        loss = F.cross_entropy(model(xf), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch * steps / _timed(step, steps)


def toolkit(
    model_name: str,
    image_size: int,
    batch: int,
    steps: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
    compile_: bool = False,
    env: DistEnv | None = None,
    grad_ckpt: bool = False,
) -> float:
    env = env or DistEnv()
    model, x, y = _setup(model_name, image_size, batch, channels_last, compile_, grad_ckpt=grad_ckpt)
    opt = build_optimizer(model, 1e-4, 0.05)
    strategy = DDPStrategy(model, opt, warmup_cosine(opt, 1, 10**6, 0.01), env, device, amp)
    cfg = Config()
    inputs = DeviceInputs(cfg.data.mean, cfg.data.std, 3, device, channels_last)
    task = Task("multiclass", tuple("abcde"))
    strategy.model.train()
    batch_dict = {"image": x, "target": y}
    train_step = TrainStep(strategy, task.loss, 1, amp, 1.0)

    def step() -> None:
        train_step([inputs(batch_dict)])

    return batch * steps / _timed(step, steps)


def save_stall(model_name: str, image_size: int, batch: int, device: torch.device) -> dict[str, float]:
    """What a checkpoint costs the training thread: a synchronous save (write, fsync, sha256,
    commit) against a background one (the CPU snapshot alone), and how much slower the steps run
    while the background write goes on. The state is the toolkit's: weights, AdamW moments after
    one step, scheduler."""
    import tempfile
    from pathlib import Path

    from retina_dist.run.checkpoints import BackgroundSaver, Checkpointer

    model, x, y = _setup(model_name, image_size, batch, False, False)
    opt = build_optimizer(model, 1e-4, 0.05)
    strategy = DDPStrategy(model, opt, warmup_cosine(opt, 1, 10**6, 0.01), DistEnv(), device, "none")
    cfg = Config()
    inputs = DeviceInputs(cfg.data.mean, cfg.data.std, 3, device, False)
    train_step = TrainStep(strategy, Task("multiclass", tuple("abcde")).loss, 1, "none", 1.0)
    batch_dict = {"image": x, "target": y}

    def step() -> float:
        started = time.perf_counter()
        train_step([inputs(batch_dict)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()
    quiet = [step() for _ in range(3)]
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        ck = Checkpointer(Path(tmp), keep_last=2)
        started = time.perf_counter()
        ck.commit(strategy.save(ck.folder, "step-00000001", {}))
        sync = time.perf_counter() - started
        size = (ck.folder / "step-00000001.pt").stat().st_size
        saver = BackgroundSaver()
        started = time.perf_counter()
        write = strategy.snapshot(ck.folder, "step-00000002", {})  # what the Trainer's async save does
        assert write is not None
        saver.submit(lambda: ck.commit(write()))
        snapshot = time.perf_counter() - started
        path = ck.folder / "step-00000002.pt"
        during = [step()]  # at least one, however fast the write
        while saver.busy() and len(during) < 50:
            during.append(step())
        saver.wait()
        ck.verify(path)
    return {
        "checkpoint_mib": size / 2**20,
        "sync_save_stall_s": sync,
        "async_save_stall_s": snapshot,
        "async_write_s": saver.last_write_s,
        "step_s": float(np.median(quiet)),
        "step_s_during_async_write": float(np.median(during)),
        "steps_during_async_write": len(during),
    }


def _rank(rank: int, world: int, port: int, args: tuple[Any, ...], out: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        env = DistEnv(rank=rank, world_size=world, launcher="bench")
        rate = toolkit(*args, env=env)  # type: ignore[misc]  # args: toolkit's leading parameters
        out.put((rank, rate))
    finally:
        dist.destroy_process_group()


def ranks(world: int, args: tuple) -> float:
    """Total img/s of ``world`` gloo ranks, each on one thread."""
    return sum(spawn_ranks(_rank, world, args))


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense


def forward_flops(model_name: str, image_size: int) -> float:
    """FLOPs of one forward pass of one image (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create(model_name, 5, 3, img_size=image_size).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def training_memory(model_name: str, image_size: int, grad_ckpt: bool) -> dict[str, float]:
    """What a training step must hold, measured on any device: the bytes autograd saves for the
    backward per image (fp32; the activations, with or without checkpointing), and the parameter
    count (fp32 weights, grads and AdamW's two moments: 16 bytes each)."""
    model = create(model_name, 5, 3, grad_ckpt=grad_ckpt, img_size=image_size).train()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Parameters are counted with the state; a tensor saved twice is held once.
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.zeros(2, 3, image_size, image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()  # checkpointed blocks save their recomputation's tensors here
    params = sum(p.numel() for p in model.parameters())
    return {"activation_mib_per_image": sum(saved.values()) / 2 / 2**20, "params_m": params / 1e6}


def peak_tflops(device: torch.device, given: float = 0.0) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run(
    model_name: str,
    image_size: int,
    batch: int,
    steps: int,
    amp: str = "none",
    peak: float = 0.0,
    channels_last: bool = False,
    compile_: bool = False,
    grad_ckpt: bool = False,
) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    fwd = forward_flops(model_name, image_size)
    variant = (channels_last, compile_)
    b = bare(model_name, image_size, batch, steps, device, *variant)
    t = toolkit(model_name, image_size, batch, steps, device, amp, *variant)
    one = ranks(1, (model_name, image_size, batch, steps, device, amp, *variant))
    two = ranks(2, (model_name, image_size, batch, steps, device, amp, *variant))
    gc = None
    if grad_ckpt:
        gc = toolkit(model_name, image_size, batch, steps, device, amp, *variant, grad_ckpt=True)
    stall = save_stall(model_name, image_size, batch, device)
    res = {
        "model": model_name,
        "image_size": image_size,
        "batch": batch,
        "steps": steps,
        "device": str(device),
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile_,
        "threads": threads,
        "bare_img_s": b,
        "toolkit_img_s": t,
        "toolkit_over_bare": t / b,
        "one_rank_img_s": one,
        "two_ranks_img_s": two,
        "scaling_efficiency_2": two / (2 * one),
        "cpu_count": os.cpu_count(),
    }
    # A training step costs about three forwards (backward ~ 2x forward).
    res["forward_gflop_per_image"] = fwd / 1e9
    res["achieved_tflop_s"] = t * 3 * fwd / 1e12
    top = peak_tflops(device, peak)
    if top:
        res["peak_tflop_s"] = top
        res["model_flop_utilisation"] = t * 3 * fwd / 1e12 / top
    if device.type == "cuda":
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    memory = training_memory(model_name, image_size, False)
    res.update(params_m=memory["params_m"], activation_mib_per_image=memory["activation_mib_per_image"])
    res["state_gib"] = memory["params_m"] * 1e6 * 16 / 2**30
    rows = [
        ["bare loop", b, ""],
        ["toolkit step", t, f"{t / b:.3f}"],
        ["1 gloo rank (1 thread)", one, ""],
        ["2 gloo ranks (1 thread each)", two, f"{two / (2 * one):.3f} scaling"],
    ]
    if gc is not None:
        ckpt_memory = training_memory(model_name, image_size, True)
        res["grad_ckpt_img_s"] = gc
        res["grad_ckpt_over_toolkit"] = gc / t
        res["grad_ckpt_activation_mib_per_image"] = ckpt_memory["activation_mib_per_image"]
        rows.append(["toolkit step, grad checkpointing", gc, f"{gc / t:.3f} of toolkit"])
    print(
        table(
            f"bench step: {model_name} {image_size} px, batch {batch}/rank, {steps} steps, {device}, "
            f"amp {amp}" + (", channels_last" if channels_last else "") + (", compiled" if compile_ else ""),
            ["", "img/s", "ratio"],
            rows,
        )
    )
    saved = f"{res['activation_mib_per_image']:.1f} MiB"
    if gc is not None:
        saved += f" ({res['grad_ckpt_activation_mib_per_image']:.1f} MiB with grad checkpointing)"
    res.update(stall)
    print(
        f"checkpoint of {stall['checkpoint_mib']:.0f} MiB: a synchronous save stalls training "
        f"{stall['sync_save_stall_s']:.3f} s (write, fsync, sha256, commit); train.async_save stalls "
        f"{stall['async_save_stall_s']:.3f} s (the CPU snapshot), then writes for "
        f"{stall['async_write_s']:.3f} s in the background, steps taking "
        f"{stall['step_s_during_async_write']:.3f} s meanwhile ({stall['steps_during_async_write']} steps) "
        f"against {stall['step_s']:.3f} s"
    )
    print(
        f"{res['params_m']:.1f}M params: {res['state_gib']:.2f} GiB of fp32 weights, grads and AdamW "
        f"moments; saved for backward {saved} per image (fp32); "
        f"{res['forward_gflop_per_image']:.1f} GFLOP forward per image"
    )
    return res
