"""The training loop: build -> (resume) -> epochs of steps -> validate -> checkpoint -> final evaluation."""

from __future__ import annotations

import logging
import math
import random
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retina_dist import dist
from retina_dist.config import Config, save_config, to_dict
from retina_dist.data.buffers import release
from retina_dist.data.manifest import (
    DataError,
    load_manifest,
    split_shards,
    write_json_atomic,
    write_text_atomic,
)
from retina_dist.data.stream import StreamSpec, batches_per_rank, make_loader, repeat_factors
from retina_dist.engine.batch import Inputs, autocast
from retina_dist.engine.checkpoint import Checkpointer, ResumeError
from retina_dist.engine.evaluate import predict, report
from retina_dist.engine.monitor import Monitor, setup_logging
from retina_dist.engine.strategy import build_strategy
from retina_dist.models import backbone_parameters, build_model
from retina_dist.tasks import Task, build_task

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: slurm/*.sh and the submitit launcher requeue on it
# Written by rank 0 once a preemption checkpoint is committed. srun's exit code can be a killed
# rank's rather than 75 (--kill-on-bad-exit), so the batch script trusts this file instead.
PREEMPTED_MARKER = "PREEMPTED"


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    batches_done: int = 0  # micro-batches this rank consumed in the current epoch
    best: float = -math.inf


class Preemption:
    """SIGUSR1 (SLURM's warning) or SIGTERM sets a flag; the loop acts on it at a step boundary."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: checkpointing at the next step boundary", signum)
        self.requested = True


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW; norms and biases are not decayed; the backbone may learn at a fraction of the head's lr."""
    backbone = backbone_parameters(model) if backbone_lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in backbone, p.ndim <= 1), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": lr * (backbone_lr_mult if in_backbone else 1.0),
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
            for (in_backbone, no_decay), params in sorted(groups.items())
        ],
        lr=lr,
    )


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.env = dist.init(
            cfg.dist.backend, cfg.dist.timeout_s, single_group=cfg.train.strategy == "deepspeed"
        )
        self.run_dir = Path(cfg.run_dir)
        setup_logging(self.run_dir, self.env.rank)
        if self.env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.device = dist.device_for(self.env)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        d = cfg.data
        self.manifest = load_manifest(d.shards)
        if self.env.is_main:  # predict / export / serve read the classes and pack size from the run alone
            write_json_atomic(self.run_dir / "manifest.json", self.manifest)
        self.task: Task = build_task(self.manifest, cfg.optim, d.train_split)
        common = dict(
            image_size=d.image_size,
            in_chans=d.in_chans,
            seed=cfg.train.seed,
            multilabel=self.task.multilabel,
            views=tuple(self.manifest.get("views", ["img"])),
        )
        repeat: tuple[float, ...] = ()
        if d.balance == "repeat":
            split = self.manifest["splits"][d.train_split]
            repeat = repeat_factors(split["histogram"], split["count"], self.task.classes, d.repeat_thresh)
            log.info(
                "class-balanced sampling, repeat factors %s",
                dict(zip(self.task.classes, repeat, strict=True)),
            )
        self.train_spec = StreamSpec(
            tuple(split_shards(d.shards, self.manifest, d.train_split)),
            cfg.train.batch_size,
            train=True,
            repeat=repeat,
            augment=d.augment,
            augment_on_device=d.augment_on == "device"
            or (d.augment_on == "auto" and self.device.type == "cuda"),
            shuffle_buffer=d.shuffle_buffer,
            **common,
        )
        self.batches = batches_per_rank(self.train_spec, self.env.world_size, cfg.train.accum_steps)
        if self.batches == 0:
            raise DataError(
                f"{d.shards}: split {d.train_split!r} has {self.train_spec.count} samples, "
                f"fewer than one step of {self.env.world_size} ranks x batch {cfg.train.batch_size} "
                f"x accum {cfg.train.accum_steps}"
            )
        self.eval_spec = lambda split: StreamSpec(
            tuple(split_shards(d.shards, self.manifest, split)), cfg.eval.batch_size, **common
        )
        self.steps_per_epoch = self.batches // cfg.train.accum_steps
        total = self.steps_per_epoch * cfg.train.epochs

        model = build_model(cfg.model, self.task.num_classes, d.in_chans)
        optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.backbone_lr_mult)
        scheduler = warmup_cosine(
            optimizer, round(cfg.optim.warmup_epochs * self.steps_per_epoch), total, cfg.optim.min_lr_ratio
        )
        self.strategy = build_strategy(cfg, model, optimizer, scheduler, self.env, self.device)
        self.inputs = Inputs(d.mean, d.std, d.in_chans, self.device, cfg.model.channels_last)
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.train.keep_last)
        self.state = TrainState()
        self._resume()
        self.monitor = Monitor(
            self.run_dir,
            self.env.is_main,
            total,
            self.state.step,
            cfg.log.tensorboard,
            cfg.log.progress,
            cfg.train.log_every,
        )
        self.preemption = Preemption()
        if self.env.is_main and dist.slurm_restart_count():
            log.info("SLURM restart %d of this job", dist.slurm_restart_count())
        if self.env.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            log.info(
                "%s: %.2fM params, %d ranks (%s) on %s, %d steps/epoch, %d epochs, train %d samples",
                cfg.model.name,
                n_params / 1e6,
                self.env.world_size,
                self.env.launcher,
                self.device,
                self.steps_per_epoch,
                cfg.train.epochs,
                self.train_spec.count,
            )

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to the end (``"done"``), to ``train.max_steps`` (``"stopped"``) or to a signal
        (``"preempted"``); every way out leaves a checkpoint to resume from."""
        cfg, s = self.cfg, self.state
        try:
            while s.epoch < cfg.train.epochs:
                outcome = self._train_epoch()
                if outcome != "epoch":
                    self._save()
                    return outcome
                s.epoch, s.batches_done = s.epoch + 1, 0
                best = False
                every = cfg.eval.every_epochs
                if every and (s.epoch % every == 0 or s.epoch == cfg.train.epochs):
                    best = self._validate(cfg.data.val_split)
                self._save(best)
            for split in cfg.eval.splits:
                if split != cfg.data.val_split or not cfg.eval.every_epochs:
                    self._validate(split)
            return "done"
        finally:
            self.monitor.close()

    def _train_epoch(self) -> str:
        cfg, s, strategy = self.cfg, self.state, self.strategy
        accum = cfg.train.accum_steps
        loader = make_loader(
            self.train_spec,
            self.env.rank,
            self.env.world_size,
            cfg.data.workers,
            epoch=s.epoch,
            num_batches=self.batches,
            skip_batches=s.batches_done,
        )
        batches = iter(loader)
        strategy.model.train()
        while s.batches_done < self.batches:
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(accum):
                batch = next(batches)
                x, y = self.inputs(batch)
                release(batch)  # its pixels are on the device: the loader worker may refill the buffer
                with strategy.accumulating(last=micro == accum - 1), autocast(self.device, cfg.train.amp):
                    loss = self.task.loss(strategy.model(x), y) / accum
                strategy.backward(loss)
                loss_sum += loss.detach()
            norm = strategy.clip_and_step(cfg.optim.max_grad_norm)
            s.step, s.batches_done = s.step + 1, s.batches_done + accum
            self.monitor.step(
                s.step,
                s.epoch,
                x.shape[0] * accum * self.env.world_size,
                lambda ls=loss_sum: float(ls),
                strategy.scheduler.get_last_lr()[0],
                lambda n=norm: float(n),
            )
            if dist.any_rank(self.preemption.requested, self.device):
                return "preempted"
            if cfg.train.max_steps and s.step >= cfg.train.max_steps:
                return "stopped"
        return "epoch"

    def _validate(self, split: str) -> bool:
        """Exactly-once evaluation of ``split``; True on rank 0 when it is the best so far."""
        self.strategy.sync_buffers()
        preds = predict(
            self.strategy.module,
            self.eval_spec(split),
            self.env,
            self.inputs,
            self.task,
            self.cfg.data.workers,
            self.cfg.train.amp,
            self.cfg.eval.tta,
        )
        if preds is None:
            return False
        val = self.cfg.data.val_split if self.cfg.eval.calibrate else None
        m = report(preds, self.task, split, self.run_dir, self.monitor, self.state.step, val)
        score = m.get("accuracy", m.get("macro_auroc")) or 0.0
        log.info(
            "%s after epoch %d: %s",
            split,
            self.state.epoch,
            ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)),
        )
        if split == self.cfg.data.val_split and score > self.state.best:
            self.state.best = score
            return True
        return False

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, best: bool = False) -> None:
        self.strategy.sync_buffers()
        extra = {
            "state": asdict(self.state),
            "rng": dist.gather_objects(rng_state()),
            "world_size": self.env.world_size,
            "config": to_dict(self.cfg),
        }
        path = self.strategy.save(self.ckpt.folder, f"step-{self.state.step:08d}", extra)
        dist.barrier()  # every rank's part is on disk before the pointer moves
        if self.env.is_main:
            self.ckpt.commit(path, best)
            log.info("checkpoint %s (epoch %d, step %d)", path, self.state.epoch, self.state.step)
        dist.barrier()

    def _resume(self) -> None:
        path = self.ckpt.latest()
        if path is None:
            return
        state = self.strategy.load(path)
        saved = TrainState(**state["state"])
        if saved.batches_done and state["world_size"] != self.env.world_size:
            raise ResumeError(
                f"{path}: saved mid-epoch with {state['world_size']} ranks; resume it with "
                f"{state['world_size']} ranks (or from an end-of-epoch checkpoint): the sample order "
                "depends on it"
            )
        self.state = saved
        if state["world_size"] == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank])
        log.info(
            "resumed from %s at epoch %d, step %d (%d batches into the epoch)",
            path.name,
            saved.epoch,
            saved.step,
            saved.batches_done,
        )


def train(cfg: Config) -> str:
    trainer = Trainer(cfg)
    marker = trainer.run_dir / PREEMPTED_MARKER
    if trainer.env.is_main:
        marker.unlink(missing_ok=True)
    try:
        outcome = trainer.fit()
        if outcome == "preempted" and trainer.env.is_main:
            write_text_atomic(marker, f"step {trainer.state.step}\n")
        return outcome
    finally:
        dist.destroy()
