"""An ensemble of trained runs of one task (``retina-dist ensemble``): each member predicts the split
exactly once, at its own input size and normalisation, its stored temperature applied; then the
members' calibrated probabilities (or their logits) are averaged with the given weights. Everything
goes to the ensemble's own folder (metrics.json, predictions/, figures/, tb/, ensemble.json,
model_card.md): no member run is written to."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from retina_dist import atomic, calibration, dist
from retina_dist.config import ConfigError
from retina_dist.engine.evaluate import Predictions, report, run_evaluator
from retina_dist.engine.monitor import Monitor
from retina_dist.engine.specs import eval_spec
from retina_dist.run import load_run
from retina_dist.run.folder import Results, RunDir
from retina_dist.tasks import Task

log = logging.getLogger(__name__)
COMBINE = ("probs", "logits")


def combine(probs: list[np.ndarray], weights: list[float], how: str, task: Task) -> np.ndarray:
    """The weighted mean of the members' probabilities, or of their logits mapped back."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    if how == "probs":
        return np.tensordot(w, np.stack(probs), axes=1)
    z = np.tensordot(w, np.stack([calibration.to_logits(p, task.multilabel) for p in probs]), axes=1)
    # the averaged log-probabilities, back through the task's own activation (temperature 1)
    return calibration.apply_temperature(
        np.exp(z) if not task.multilabel else 1 / (1 + np.exp(-z)), 1.0, task.multilabel, task.groups
    )


def evaluate_ensemble(
    run_dirs: list[str],
    split: str,
    out: str | Path,
    weights: list[float] | None = None,
    how: str = "probs",
) -> dict[str, Any]:
    """The ensemble's metrics on ``split`` (rank 0; empty elsewhere), written under ``out``."""
    if how not in COMBINE:
        raise ConfigError(f"--combine {how!r}: one of {', '.join(COMBINE)}")
    weights = weights or [1.0] * len(run_dirs)
    if len(weights) != len(run_dirs) or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(
            f"--weights {weights}: one non-negative weight per run ({len(run_dirs)}), not all 0"
        )
    members = [load_run(r) for r in run_dirs]
    first = members[0]
    for m in members[1:]:
        if (m.task.classes, m.task.multilabel) != (first.task.classes, first.task.multilabel):
            raise ConfigError(
                f"{m.run.root}: its task ({', '.join(m.task.classes)}) is not {first.run.root}'s "
                f"({', '.join(first.task.classes)}); an ensemble averages runs of one task"
            )
        if split not in m.manifest.splits:
            raise ConfigError(f"{m.run.root}: its shards have no {split!r} split")
    task = first.task
    env = dist.init(first.cfg.dist.backend, first.cfg.dist.timeout_s)
    try:
        device = dist.device_for(env)
        calibrated: list[Predictions] = []
        for m in members:
            preds = run_evaluator(m, env, device).predict(eval_spec(m.cfg, m.manifest, task, split))
            m.model.cpu()
            if preds is None:
                continue
            fitted = m.run.read_calibration()
            probs = preds.probs
            if fitted and m.cfg.eval.calibrate:
                probs = task.apply_temperature(probs, float(fitted["temperature"]))
            order = np.argsort(preds.keys, kind="stable")
            calibrated.append(
                Predictions(
                    [preds.keys[i] for i in order],
                    preds.target[order],
                    probs[order],
                    [preds.patients[i] for i in order] if preds.patients else [],
                )
            )
        if not env.is_main:
            return {}
        base = calibrated[0]
        for m, p in zip(members[1:], calibrated[1:], strict=True):
            if p.keys != base.keys:
                raise ConfigError(
                    f"{m.run.root}: its {split!r} split holds other samples than {first.run.root}'s "
                    f"({len(set(p.keys) ^ set(base.keys))} keys differ); an ensemble needs the same split"
                )
        ens = Predictions(
            base.keys,
            base.target,
            combine([p.probs for p in calibrated], weights, how, task),
            base.patients,
        )
        folder = RunDir(out).create()
        monitor = Monitor(folder.tb, True, 0, 0, "off", purge=False)
        try:
            agg = first.cfg.eval.patient_agg
            metrics = report(ens, task, split, folder, Results(folder.root), monitor, 0, "none", agg)
        finally:
            monitor.close()
        target = base.target.astype(int)
        record = {
            "split": split,
            "combine": how,
            "members": [
                {
                    "run": str(m.run.root),
                    "model": m.cfg.model.name,
                    "weight": w,
                    "metrics": _headline(task.metrics(target, p.probs), task),
                }
                for m, w, p in zip(members, weights, calibrated, strict=True)
            ],
            "ensemble": _headline(metrics, task),
        }
        atomic.write_json(folder.root / "ensemble.json", record)
        atomic.write_text(folder.root / "model_card.md", _card(record, task.classes))
        log.info("ensemble of %d runs on %s: %s -> %s", len(members), split, record["ensemble"], folder.root)
        return record
    finally:
        dist.destroy()


def _headline(m: dict[str, Any], task: Task) -> dict[str, float]:
    from retina_dist.infer.model_card import is_headline

    return {k: float(v) for k, v in m.items() if is_headline(k, task) and isinstance(v, int | float)}


def _card(record: dict[str, Any], classes: tuple[str, ...]) -> str:
    keys = list(record["ensemble"])
    lines = [
        f"# Ensemble of {len(record['members'])} runs",
        "",
        f"Task: {', '.join(classes)}. Split: {record['split']}. Each member's probabilities calibrated "
        f"with its own stored temperature, then their weighted mean ({record['combine']}).",
        "",
        "| member | model | weight | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for m in record["members"]:
        cells = " | ".join(f"{m['metrics'].get(k, float('nan')):.4f}" for k in keys)
        lines.append(f"| {m['run']} | {m['model']} | {m['weight']:g} | {cells} |")
    cells = " | ".join(f"**{record['ensemble'][k]:.4f}**" for k in keys)
    lines.append(f"| ensemble | | | {cells} |")
    lines += [
        "",
        "Caveats: the members' own caveats hold (see each run's model card); an ensemble of runs "
        "trained on the same data is no external validation.",
    ]
    return "\n".join(lines) + "\n"
