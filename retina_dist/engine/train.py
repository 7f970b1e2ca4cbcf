"""The training loop: build -> (resume) -> epochs of steps -> validate -> checkpoint -> final evaluation."""

from __future__ import annotations

import itertools
import logging
import math
import random
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from retina_dist import dist
from retina_dist.config import Config, ConfigError, to_dict
from retina_dist.data.manifest import DataError, load_manifest
from retina_dist.data.stream import DeviceFeeder, DeviceInputs, batches_per_rank, make_loader
from retina_dist.engine.evaluate import Evaluator, report
from retina_dist.engine.mix import build_mix
from retina_dist.engine.monitor import Monitor, setup_logging
from retina_dist.engine.optim import build_optimizer, effective_lr, warmup_cosine
from retina_dist.engine.specs import eval_spec, train_spec
from retina_dist.engine.step import StepOutput, TrainStep
from retina_dist.engine.strategy import DDPStrategy, build_strategy
from retina_dist.models import build_model
from retina_dist.models.pretrained import LoadReport
from retina_dist.run.checkpoints import BackgroundSaver, ResumeError
from retina_dist.run.folder import RunDir
from retina_dist.tasks import Task, build_task

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: slurm/*.sh and the submitit launcher requeue on it


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


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
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
            cfg.dist.backend, cfg.dist.timeout_s, single_group=cfg.train.strategy in ("deepspeed", "fsdp")
        )
        self.run = RunDir(cfg.run_dir)
        setup_logging(self.run.log_path, self.env.rank)
        if self.env.is_main:
            self.run.write_config(cfg)
        self.device = dist.device_for(self.env)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        d = cfg.data
        self.manifest = load_manifest(d.shards)
        if self.env.is_main:  # predict / export / serve read the classes and pack size from the run alone
            self.run.write_manifest(self.manifest)
        self.task: Task = build_task(self.manifest, cfg.optim, d.train_split)
        self.train_spec = train_spec(cfg, self.manifest, self.task, self.device)
        self.batches = batches_per_rank(self.train_spec, self.env.world_size, cfg.train.accum_steps)
        if self.batches == 0:
            raise DataError(
                f"{d.shards}: split {d.train_split!r} has {self.train_spec.count} samples, "
                f"fewer than one step of {self.env.world_size} ranks x batch {cfg.train.batch_size} "
                f"x accum {cfg.train.accum_steps}"
            )
        self.steps_per_epoch = self.batches // cfg.train.accum_steps
        total = self.steps_per_epoch * cfg.train.epochs

        reports: list[LoadReport] = []
        model = build_model(
            cfg.model, self.task.num_classes, d.in_chans, d.image_size, reports, self.task.groups
        )
        if reports and self.env.is_main:
            self.run.write_pretrained_report([r.to_dict() for r in reports])
        o = cfg.optim
        lr = effective_lr(o, cfg.train.batch_size * cfg.train.accum_steps * self.env.world_size)
        optimizer = build_optimizer(model, lr, o.weight_decay, o.backbone_lr_mult, o.layer_decay)
        self.mix = build_mix(o, self.task, d.image_size)
        scheduler = warmup_cosine(
            optimizer, round(cfg.optim.warmup_epochs * self.steps_per_epoch), total, cfg.optim.min_lr_ratio
        )
        self.strategy = build_strategy(cfg, model, optimizer, scheduler, self.env, self.device)
        self.train_step = TrainStep(
            self.strategy, self.task.loss, cfg.train.accum_steps, cfg.train.amp, cfg.optim.max_grad_norm
        )
        self.inputs = DeviceInputs(
            d.mean, d.std, d.in_chans, self.device, cfg.model.channels_last, erase=d.reprob
        )
        self.evaluator = Evaluator(
            self.strategy.module,
            self.env,
            self.inputs,
            self.task,
            d.workers,
            cfg.train.amp,
            cfg.eval.tta,
            lockstep=self.strategy.sharded_forward,
        )
        self.ema: Any = None
        self.ema_evaluator: Evaluator | None = None
        if cfg.train.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.strategy.module, decay=cfg.train.ema_decay, device=self.device)
            self.ema_evaluator = Evaluator(
                self.ema.module, self.env, self.inputs, self.task, d.workers, cfg.train.amp, cfg.eval.tta
            )
        self.ckpt = self.run.checkpointer(cfg.train.keep_last)
        self.saver = BackgroundSaver() if cfg.train.async_save else None
        self.state = TrainState()
        self._resume()
        self.monitor = Monitor(
            self.run.tb if self.env.is_main and cfg.log.tensorboard else None,
            self.env.is_main,
            total,
            self.state.step,
            cfg.log.progress,
            cfg.train.log_every,
        )
        self.preemption = Preemption()
        self.agreement = dist.LaggedAgreement(self.device)
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
                    self._settle_saves()
                    return outcome
                s.epoch, s.batches_done = s.epoch + 1, 0
                best = False
                every = cfg.eval.every_epochs
                if every and (s.epoch % every == 0 or s.epoch == cfg.train.epochs):
                    best = self._validate(cfg.data.val_split)
                self._save(best)
            self._settle_saves()
            for split in cfg.eval.splits:
                if split != cfg.data.val_split or not cfg.eval.every_epochs:
                    self._validate(split)
            return "done"
        finally:
            try:
                if self.saver is not None:  # a write in flight ends whole (or its error is raised)
                    self.saver.wait()
            finally:
                self.monitor.close()

    def _train_epoch(self) -> str:
        cfg, s = self.cfg, self.state
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
        feeder = DeviceFeeder(loader, self.inputs)
        feed = iter(feeder)
        self.strategy.model.train()
        while s.batches_done < self.batches:
            # islice takes exactly accum batches (zip with a range would pull, and lose, one more).
            micro = ((x, y) for x, y, _ in itertools.islice(feed, accum))
            mix = self.mix
            out = self.train_step(micro if mix is None else (mix(x, y) for x, y in micro))
            if self.ema is not None:
                self.ema.update(self.strategy.module, step=s.step)
            s.step, s.batches_done = s.step + 1, s.batches_done + accum
            self._log(out)
            self._check_skipped(feeder)
            if self.agreement.poll(self.preemption.requested):
                return "preempted"
            if cfg.train.max_steps and s.step >= cfg.train.max_steps:
                self.agreement.drain()
                return "stopped"
        self._check_skipped(feeder, epoch_end=True)
        # A signal in the epoch's last step is answered here, at a boundary every rank reaches.
        return "preempted" if self.agreement.drain() else "epoch"

    def _check_skipped(self, feeder: DeviceFeeder, epoch_end: bool = False) -> None:
        """Undecodable samples: counted over all ranks at the epoch's end (log and TensorBoard), and a
        ``DataError`` once they pass ``data.max_skipped_frac`` (this rank's share is checked after each
        step once it has skipped a few, so damaged shards stop a run early, not after an epoch)."""
        skipped, seen = feeder.skipped, feeder.seen
        if epoch_end:
            counts = torch.tensor([skipped, seen], dtype=torch.int64, device=self.device)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)
            skipped, seen = (int(v) for v in counts.tolist())
            if skipped:
                log.warning(
                    "epoch %d: %d of %d training samples could not be decoded and were skipped (%.2f%%); "
                    "retina-dist verify %s names the damaged shards",
                    self.state.epoch,
                    skipped,
                    skipped + seen,
                    100 * skipped / (skipped + seen),
                    self.cfg.data.shards,
                )
                frac = skipped / (skipped + seen)
                self.monitor.scalars("data", {"skipped": skipped, "skipped_frac": frac}, self.state.step)
        elif skipped < 8:
            return
        limit = self.cfg.data.max_skipped_frac
        if skipped > limit * (skipped + seen):
            where = "in this epoch" if epoch_end else f"so far on rank {self.env.rank}"
            raise DataError(
                f"{skipped} of {skipped + seen} training samples {where} could not be decoded, more than "
                f"data.max_skipped_frac={limit}: the shards in {self.cfg.data.shards} are damaged "
                "(retina-dist verify names them; repack from the source)"
            )

    def _log(self, out: StepOutput) -> None:
        logged = self.monitor.step(
            self.state.step,
            self.state.epoch,
            out.samples * self.env.world_size,
            lambda: float(out.loss),
            self.strategy.scheduler.get_last_lr()[0],
            lambda: float(out.grad_norm),
        )
        if logged:
            self.strategy.check_finite()

    def _validate(self, split: str) -> bool:
        """Exactly-once evaluation of ``split``; True on rank 0 when it is the best so far."""
        self.strategy.sync_buffers()
        preds = self.evaluator.predict(eval_spec(self.cfg, self.manifest, self.task, split))
        if preds is None:
            return False
        val = self.cfg.data.val_split
        mode = "none" if not self.cfg.eval.calibrate else "fit" if split == val else "apply"
        agg = self.cfg.eval.patient_agg
        step = self.state.step
        m = report(preds, self.task, split, self.run, self.run.training, self.monitor, step, mode, agg)
        score = self._score(m)
        log.info(
            "%s after epoch %d: %s",
            split,
            self.state.epoch,
            ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)),
        )
        if self.ema_evaluator is not None:
            ema = self.ema_evaluator.predict(eval_spec(self.cfg, self.manifest, self.task, split))
            if ema is not None:
                e = report(
                    ema,
                    self.task,
                    f"{split}_ema",
                    self.run,
                    self.run.training,
                    self.monitor,
                    self.state.step,
                    patient_agg=agg,
                )
                log.info(
                    "%s_ema: %s",
                    split,
                    ", ".join(f"{k} {v:.4f}" for k, v in e.items() if isinstance(v, float)),
                )
        if split == val and score > self.state.best:
            self.state.best = score
            return True
        return False

    def _score(self, m: dict[str, Any]) -> float:
        """The validation figure best.pt is chosen by (higher is better; undefined counts as worst)."""
        key = self.cfg.eval.best_metric
        if key == "auto":
            key = "accuracy" if self.task.type == "multiclass" else "macro_auroc"
        if key not in m:
            known = sorted(k for k, v in m.items() if isinstance(v, float))
            raise ConfigError(f"eval.best_metric {key!r} is not a metric of this task; one of {known}")
        value = m[key]
        return float(value) if isinstance(value, (int, float)) else -math.inf

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, best: bool = False) -> None:
        self.strategy.check_finite()  # diverged weights never become a checkpoint
        self.strategy.sync_buffers()
        extra = {
            "state": asdict(self.state),
            "rng": dist.gather_objects(rng_state()),
            "world_size": self.env.world_size,
            "config": to_dict(self.cfg),
        }
        if self.ema is not None:
            extra["ema"] = self.ema.module.state_dict()
        name = f"step-{self.state.step:08d}"
        if self.saver is not None:
            self._save_in_background(name, extra, best)
            return
        path = self.strategy.save(self.ckpt.folder, name, extra)
        dist.barrier()  # every rank's part is on disk before the pointer moves
        if self.env.is_main:
            self.ckpt.commit(path, best)
            log.info("checkpoint %s (epoch %d, step %d)", path, self.state.epoch, self.state.step)
        dist.barrier()

    def _save_in_background(self, name: str, extra: dict[str, Any], best: bool) -> None:
        """DDP's one file, from rank 0: the state copied to CPU now (the only wait), written,
        hashed and committed on the saver's thread while training goes on."""
        assert self.saver is not None and isinstance(self.strategy, DDPStrategy)  # config checks it
        started = time.perf_counter()
        write = self.strategy.snapshot(self.ckpt.folder, name, extra)
        if write is None:
            return
        stall = time.perf_counter() - started
        epoch, step = self.state.epoch, self.state.step

        def commit() -> None:
            path = write()
            self.ckpt.commit(path, best)
            log.info("checkpoint %s (epoch %d, step %d; the step waited %.3f s)", path, epoch, step, stall)

        self.saver.submit(commit)

    def _settle_saves(self) -> None:
        """Every checkpoint of the run on disk and committed, on every rank's word, before a later
        phase (final evaluation, exit) relies on ``latest``."""
        if self.saver is not None:
            self.saver.wait()
            dist.barrier()

    def _resume(self) -> None:
        path = self.ckpt.resumable()
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
        if self.ema is not None:
            if "ema" in state:
                self.ema.module.load_state_dict(state["ema"])
            else:
                log.warning("%s holds no EMA weights: the EMA restarts from the resumed weights", path.name)
                self.ema.set(self.strategy.module)
        if state["world_size"] == self.env.world_size:
            set_rng_state(state["rng"][self.env.rank])
        log.info(
            "resumed from %s at epoch %d, step %d (%d batches into the epoch)",
            path.name,
            saved.epoch,
            saved.step,
            saved.batches_done,
        )


class CollectiveTimeout(RuntimeError):
    """A collective that other ranks never joined within ``dist.timeout_s``."""


def train(cfg: Config) -> str:
    trainer = Trainer(cfg)
    if trainer.env.is_main:
        trainer.run.clear_preempted()
    try:
        outcome = trainer.fit()
        if outcome == "preempted" and trainer.env.is_main:
            trainer.run.mark_preempted(trainer.state.step)
        return outcome
    except RuntimeError as err:
        # gloo words it "Timed out waiting … for recv" or "Application timeout caused pair closure".
        if not any(w in str(err).lower() for w in ("timed out", "timeout")):
            raise
        latest = trainer.ckpt.latest()
        raise CollectiveTimeout(
            f"rank {trainer.env.rank}: a collective did not complete within dist.timeout_s="
            f"{cfg.dist.timeout_s} s at step {trainer.state.step}: another rank is hung or gone. The run "
            f"folder is resumable from {latest.name if latest else 'the start'}"
        ) from err
    finally:
        dist.destroy()
