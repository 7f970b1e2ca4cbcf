"""A later evaluation of a trained run (``retina-dist eval``): exact-once like the training's own,
but written under ``evals/<split>-<weights>/`` with the run's stored calibration applied (never
refitted), and appended to TensorBoard under ``eval-<split>-<weights>/``. The training's config,
metrics, calibration, predictions, figures and TensorBoard history are left exactly as they were."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from retina_dist import dist
from retina_dist.engine.evaluate import report, run_evaluator
from retina_dist.engine.monitor import Monitor
from retina_dist.engine.specs import eval_spec
from retina_dist.run import load_run

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: str | Path, splits: list[str] | None = None, weights: str | Path | None = None
) -> dict[str, dict]:
    """Metrics per split (on rank 0; empty elsewhere)."""
    loaded = load_run(run_dir, weights)
    cfg, run, task = loaded.cfg, loaded.run, loaded.task
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        evaluator = run_evaluator(loaded, env, dist.device_for(env))
        latest = run.checkpointer().latest()
        step = _step_of(latest.name) if latest else 0
        label = latest.name.removesuffix(".pt") if weights is None and latest else Path(str(weights)).stem
        monitor = Monitor(
            run.tb if env.is_main and cfg.log.tensorboard else None, env.is_main, 0, 0, "off", purge=False
        )
        out: dict[str, dict] = {}
        try:
            for split in splits or cfg.eval.splits:
                preds = evaluator.predict(eval_spec(cfg, loaded.manifest, task, split))
                if preds is None:
                    continue
                results = run.evaluation(f"{split}-{label}")
                mode = "apply" if cfg.eval.calibrate else "none"
                agg = cfg.eval.patient_agg
                out[split] = report(preds, task, split, run, results, monitor, step, mode, agg)
                log.info(
                    "%s (%s): %s -> %s",
                    split,
                    loaded.weights,
                    ", ".join(f"{k} {v:.4f}" for k, v in out[split].items() if isinstance(v, float)),
                    results.root,
                )
        finally:
            monitor.close()
        return out
    finally:
        dist.destroy()


def _step_of(name: str) -> int:
    m = re.match(r"step-(\d+)", name)
    return int(m.group(1)) if m else 0
