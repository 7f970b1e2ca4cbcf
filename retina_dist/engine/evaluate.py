"""Exactly-once evaluation: every sample of a split is forwarded by one rank, once, and counted.

Each rank runs its own shards with no collective inside the loop (ranks may hold different numbers of
samples; nothing is padded or repeated), on the unwrapped module so no DDP hook waits on another
rank. One gather at the end unites (key, target, probabilities); rank 0 checks the keys against the
manifest count and fails loudly on a missing or duplicated sample.

A sharded module (FSDP) cannot run alone: each forward all-gathers its weights with the other ranks.
It is evaluated in ``lockstep``: a rank whose shards are done forwards a one-image stand-in, whose
result is dropped, until every rank is done. Still each sample is predicted once.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn

from retina_dist import calibration, dist, figures, metrics
from retina_dist.data.stream import DeviceFeeder, DeviceInputs, StreamSpec, make_loader
from retina_dist.engine import patients
from retina_dist.engine.amp import autocast
from retina_dist.run.folder import Results, RunDir
from retina_dist.run.load import LoadedRun
from retina_dist.tasks import Task

log = logging.getLogger(__name__)


class ExactOnceError(RuntimeError):
    pass


@dataclass
class Predictions:
    keys: list[str]
    target: np.ndarray
    probs: np.ndarray
    patients: list[str] = field(default_factory=list)  # per key, when the shards name patients


class Evaluator:
    """Exact-once predictions over a split, on the unwrapped module: the Trainer's validation and the
    ``eval``, ``ensemble``-style commands all run it."""

    def __init__(
        self,
        module: nn.Module,
        env: dist.DistEnv,
        inputs: DeviceInputs,
        task: Task,
        workers: int,
        amp: str = "none",
        tta: bool = False,
        lockstep: bool = False,
    ) -> None:
        self.module, self.env, self.inputs, self.task = module, env, inputs, task
        self.workers, self.amp, self.tta = workers, amp, tta
        self.lockstep = lockstep and env.distributed

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.inputs.device, self.amp):
            p = self.task.probabilities(self.module(x))
            if self.tta:
                p = (p + self.task.probabilities(self.module(x.flip(-1)))) / 2
        return p

    def _in_lockstep(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """This rank's batches, with a stand-in forward for each step other ranks still take."""
        first = next(batches, None)
        shapes = [s for s in dist.gather_objects(None if first is None else tuple(first[0].shape[1:])) if s]
        if not shapes:
            return
        stand_in = torch.zeros((1, *shapes[0]), device=self.inputs.device)
        item = first
        while dist.any_rank(item is not None, self.inputs.device):
            if item is None:
                self._probabilities(stand_in)
            else:
                yield item
            item = next(batches, None)

    @torch.no_grad()
    def predict(self, spec: StreamSpec) -> Predictions | None:
        """Predictions for the whole split on rank 0 (None elsewhere); ``tta`` averages the
        probabilities of each image and its horizontal flip."""
        module = self.module
        was_training = module.training
        module.eval()
        keys: list[str] = []
        patients: list[str] = []
        targets, probs = [], []
        loader = make_loader(spec, self.env.rank, self.env.world_size, self.workers)
        feeder = DeviceFeeder(loader, self.inputs)
        batches = self._in_lockstep(iter(feeder)) if self.lockstep else iter(feeder)
        for x, y, batch_keys in batches:
            p = self._probabilities(x)
            keys += batch_keys
            patients += feeder.patients
            targets.append(y.cpu())
            probs.append(p.float().cpu())
        module.train(was_training)
        parts = dist.gather_objects((keys, _cat(targets), _cat(probs), patients))
        if not self.env.is_main:
            return None
        all_keys = [k for p in parts for k in p[0]]
        check_exact_once(all_keys, spec.count)
        return Predictions(
            all_keys,
            torch.cat([p[1] for p in parts if len(p[1])]).numpy(),
            torch.cat([p[2] for p in parts if len(p[2])]).numpy(),
            [k for p in parts for k in p[3]],
        )


def run_evaluator(loaded: LoadedRun, env: dist.DistEnv, device: torch.device) -> Evaluator:
    """The Evaluator of a trained run (its model moved to ``device``), with the run's own input
    normalisation, loader workers, AMP and TTA: what every later command evaluates it with."""
    cfg, d = loaded.cfg, loaded.cfg.data
    inputs = DeviceInputs(d.mean, d.std, d.in_chans, device, cfg.model.channels_last)
    model = loaded.model.to(device)
    return Evaluator(model, env, inputs, loaded.task, d.workers, cfg.train.amp, cfg.eval.tta)


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts) if ts else torch.empty(0)


def check_exact_once(keys: list[str], expected: int) -> None:
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes or len(keys) != expected:
        raise ExactOnceError(
            f"evaluation saw {len(set(keys))} unique keys in {len(keys)} predictions, "
            f"manifest says {expected}; duplicated: {dupes[:5]}"
        )


def write_predictions(preds: Predictions, task: Task, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.argsort(preds.keys, kind="stable")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", *task.target_columns(), *[f"prob_{c}" for c in task.classes]])
        for i in order:
            t = preds.target[i]
            tcols = [int(v) for v in t] if task.vector_target else [int(t)]
            w.writerow([preds.keys[i], *tcols, *[f"{p:.6f}" for p in preds.probs[i]]])


def calibrate(preds: Predictions, task: Task, split: str, run: RunDir, fit: bool) -> dict[str, Any]:
    """With ``fit`` (the training's validation split): fit the temperature (and multi-label
    thresholds) on these predictions and store them in the run; otherwise apply the stored ones.
    Returns the extra metrics (none when the run has no calibration)."""
    target = preds.target.astype(int)
    if fit:
        fitted: dict[str, Any] = {
            "split": split,
            "temperature": task.fit_temperature(preds.probs, target),
        }
        if task.multilabel:
            fitted["thresholds"] = dict(
                zip(task.classes, calibration.tune_thresholds(target, preds.probs), strict=True)
            )
        run.write_calibration(fitted)
    else:
        fitted = run.read_calibration()
        if not fitted:
            return {}
    t = float(fitted["temperature"])
    scaled = task.apply_temperature(preds.probs, t)
    conf, correct = task.confidence(scaled, target)
    out: dict[str, Any] = {
        "temperature": t,
        "ece_calibrated": metrics.expected_calibration_error(conf, correct),
    }
    if task.multilabel:
        thr = np.array([fitted["thresholds"][c] for c in task.classes])
        pred = (preds.probs >= thr).astype(int)
        out["micro_f1_tuned"] = float(skm.f1_score(target, pred, average="micro", zero_division=0))
        out["macro_f1_tuned"] = float(skm.f1_score(target, pred, average="macro", zero_division=0))
        out["thresholds_from"] = fitted["split"]
    return out


def report(
    preds: Predictions,
    task: Task,
    split: str,
    run: RunDir,
    results: Results,
    monitor: Any,
    step: int,
    calibration_mode: str = "none",
    patient_agg: str = "mean",
) -> dict[str, Any]:
    """Metrics, predictions CSV and figures for one split (rank 0) into ``results``, scalars and
    figures to ``monitor`` under ``results.tag(split)``. ``calibration_mode``: ``fit`` on this split,
    ``apply`` the run's stored calibration, or ``none``. Where patients have several images, the
    same again per patient (``<split>_patients``: metrics, predictions CSV, figures, scalars) from
    the calibrated probabilities aggregated by ``patient_agg`` (``engine/patients.py``)."""
    target = preds.target.astype(int)
    m = task.metrics(target, preds.probs)
    if calibration_mode != "none":
        m.update(calibrate(preds, task, split, run, fit=calibration_mode == "fit"))
    write_predictions(preds, task, results.predictions(split))
    results.update_metrics(split, {"step": step, **m})
    tag = results.tag(split)
    monitor.scalars(tag, m, step)
    _figures(target, preds.probs, m, task, split, results, monitor, tag, step)
    probs = preds.probs
    if "temperature" in m:
        probs = task.apply_temperature(probs, float(m["temperature"]))
    pp = patients.aggregate(preds.patients, target, probs, task, patient_agg)
    if pp is not None:
        name = f"{split}_patients"
        pm = {
            **task.metrics(pp.target.astype(int), pp.probs),
            "n": len(pp.patients),
            "images": int(pp.images.sum()),
            "patient_agg": patient_agg,
        }
        patients.write(pp, task, results.predictions(name))
        results.update_metrics(name, {"step": step, **pm})
        monitor.scalars(f"{tag}_patients", pm, step)
        _figures(pp.target.astype(int), pp.probs, pm, task, name, results, monitor, f"{tag}_patients", step)
        log.info(
            "%s per patient (%d patients, %d images; %s of calibrated probabilities): %s",
            split,
            len(pp.patients),
            int(pp.images.sum()),
            patient_agg,
            ", ".join(f"{k} {v:.4f}" for k, v in pm.items() if isinstance(v, float)),
        )
    return m


def _figures(
    target: np.ndarray,
    probs: np.ndarray,
    m: dict[str, Any],
    task: Task,
    split: str,
    results: Results,
    monitor: Any,
    tag: str,
    step: int,
) -> None:
    fig_dir = results.figures
    fig_dir.mkdir(parents=True, exist_ok=True)
    onehot = target if task.vector_target else np.eye(task.num_classes)[target]
    figs = {
        "roc": figures.roc(onehot, probs, task.classes, f"ROC — {split}"),
        "pr": figures.pr(onehot, probs, task.classes, f"precision-recall — {split}"),
        "f1": figures.f1_bars(m["per_class_f1"], f"per-class F1 — {split}"),
    }
    conf, correct = task.confidence(probs, target)
    figs["reliability"] = figures.reliability(conf, correct, f"reliability (ECE {m['ece']:.3f}) — {split}")
    if task.type == "multiclass":
        cm = np.array(m["confusion_matrix"])
        figs["confusion"] = figures.confusion(cm, task.classes, False, f"confusion — {split}")
        figs["confusion_norm"] = figures.confusion(
            cm, task.classes, True, f"confusion (row-normalised) — {split}"
        )
    for name, classes, _ in task.head_columns():
        cm = np.array(m["heads"][name]["confusion_matrix"])
        figs[f"{name}_confusion"] = figures.confusion(cm, classes, False, f"{name} confusion — {split}")
    for name, fig in figs.items():
        fig.savefig(fig_dir / f"{split}_{name}.png")
        monitor.figure(f"{tag}/{name}", fig, step)
        figures.close(fig)
