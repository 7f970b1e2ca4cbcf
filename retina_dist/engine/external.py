"""External validation (``retina-dist eval --shards OTHER --label-map MAP.yaml``): a trained run
evaluated exactly once on another packed dataset, both label sets mapped onto declared common classes.

A map names, for each common class, the run's classes whose calibrated probabilities make it up (a
multi-class run's are summed, a multi-label run's maximum taken) and the other dataset's classes that
make a sample positive for it. Every class of the other dataset must be placed: in a common class, or
among ``negative`` (``"*"``: every class not named). Names either dataset does not have, and classes
left unplaced, are errors naming them. When both sides partition into the common classes (each run
class and each sample in exactly one) the common task is multi-class, else multi-label. Results go
to ``<run>/evals/external-<name>-<split>/`` with the mapping beside them, never into the training's
own files or TensorBoard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from retina_dist import atomic, dist
from retina_dist.config import ConfigError
from retina_dist.data.manifest import load_manifest
from retina_dist.engine.evaluate import Predictions, report, run_evaluator
from retina_dist.engine.monitor import Monitor
from retina_dist.engine.specs import eval_spec
from retina_dist.run import load_run
from retina_dist.tasks import Task, build_task

log = logging.getLogger(__name__)
EXTERNAL = "external.json"


@dataclass(frozen=True)
class LabelMap:
    classes: tuple[str, ...]  # the common classes
    run: tuple[tuple[int, ...], ...]  # per common class: the run's class indices
    other: tuple[tuple[int, ...], ...]  # per common class: the other dataset's class indices
    exclusive: bool  # both sides partition: a multi-class common task
    source: dict[str, Any]

    @property
    def task(self) -> Task:
        return Task("multiclass" if self.exclusive else "multilabel", self.classes)


def identity(run_task: Task) -> LabelMap:
    idx = tuple((i,) for i in range(len(run_task.classes)))
    src = {"classes": {c: {"run": [c], "other": [c]} for c in run_task.classes}}
    return LabelMap(run_task.classes, idx, idx, not run_task.multilabel, src)


def read_label_map(path: str | Path, run_task: Task, other_task: Task) -> LabelMap:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the label map ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict) or not raw["classes"]:
        raise ConfigError(f"{path}: expected 'classes: {{NAME: {{run: [...], other: [...]}}}}'")
    run_index = {c: i for i, c in enumerate(run_task.classes)}
    other_index = {c: i for i, c in enumerate(other_task.classes)}
    names, run_sets, other_sets, unknown = [], [], [], []
    for name, spec in raw["classes"].items():
        if not isinstance(spec, dict) or not spec.get("run") or not spec.get("other"):
            raise ConfigError(f"{path}: common class {name!r} needs both 'run' and 'other' lists")
        unknown += [f"run class {c!r}" for c in map(str, spec["run"]) if c not in run_index]
        unknown += [f"other class {c!r}" for c in map(str, spec["other"]) if c not in other_index]
        names.append(str(name))
        run_sets.append(tuple(run_index[c] for c in map(str, spec["run"]) if c in run_index))
        other_sets.append(tuple(other_index[c] for c in map(str, spec["other"]) if c in other_index))
    negative = raw.get("negative", [])
    placed = {i for s in other_sets for i in s}
    if negative == "*":
        negative_idx = set(range(len(other_task.classes))) - placed
    else:
        unknown += [f"other class {c!r}" for c in map(str, negative) if c not in other_index]
        negative_idx = {other_index[c] for c in map(str, negative) if c in other_index}
    if unknown:
        raise ConfigError(
            f"{path}: {', '.join(unknown)} not among the classes "
            f"(run: {', '.join(run_task.classes)}; other: {', '.join(other_task.classes)})"
        )
    unplaced = [c for i, c in enumerate(other_task.classes) if i not in placed | negative_idx]
    if unplaced:
        raise ConfigError(
            f"{path}: the other dataset's classes {unplaced} are in no common class and not under "
            "'negative' (list them there, or negative: '*' for every class not named)"
        )
    run_counts = np.bincount([i for s in run_sets for i in s], minlength=len(run_task.classes))
    other_counts = np.bincount([i for s in other_sets for i in s], minlength=len(other_task.classes))
    exclusive = (
        not run_task.multilabel
        and not other_task.multilabel
        and bool((run_counts == 1).all() and (other_counts == 1).all())
    )
    return LabelMap(tuple(names), tuple(run_sets), tuple(other_sets), exclusive, raw)


def map_predictions(preds: Predictions, lm: LabelMap, run_task: Task, other_task: Task) -> Predictions:
    """The run's calibrated probabilities and the other dataset's targets in the common classes."""
    n, k = len(preds.keys), len(lm.classes)
    if other_task.multilabel:
        hot = preds.target.astype(int)
    else:
        hot = np.eye(len(other_task.classes), dtype=int)[preds.target.astype(int)]
    target = np.stack([hot[:, list(s)].max(1) for s in lm.other], 1) if n else np.zeros((0, k), int)
    reduce = np.max if run_task.multilabel else np.sum
    probs = np.stack([reduce(preds.probs[:, list(s)], axis=1) for s in lm.run], 1).clip(0, 1)
    if lm.exclusive:
        return Predictions(preds.keys, target.argmax(1), probs, preds.patients)
    return Predictions(preds.keys, target, probs, preds.patients)


def evaluate_external(
    run_dir: str | Path, shards: str, label_map: str | None, split: str, name: str = ""
) -> dict[str, Any]:
    """Metrics of the run on ``shards``' ``split`` in the common classes (rank 0; empty elsewhere)."""
    loaded = load_run(run_dir)
    cfg, run, run_task = loaded.cfg, loaded.run, loaded.task
    other = load_manifest(shards)
    if split not in other.splits:
        raise ConfigError(f"{shards}: no {split!r} split (it has {', '.join(other.splits)})")
    if tuple(other.views) != tuple(loaded.manifest.views):
        raise ConfigError(f"{shards}: samples of views {other.views}, the run takes {loaded.manifest.views}")
    other_task = build_task(other)
    if label_map:
        lm = read_label_map(label_map, run_task, other_task)
    elif (other_task.classes, other_task.multilabel) == (run_task.classes, run_task.multilabel):
        lm = identity(run_task)
    else:
        raise ConfigError(
            f"{shards}: its classes ({', '.join(other_task.classes)}) are not the run's "
            f"({', '.join(run_task.classes)}): pass --label-map MAP.yaml"
        )
    name = name or Path(str(shards).rstrip("/")).name
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        evaluator = run_evaluator(loaded, env, dist.device_for(env))
        other_cfg = _with_shards(cfg, shards)
        preds = evaluator.predict(eval_spec(other_cfg, other, other_task, split))
        if preds is None:
            return {}
        fitted = run.read_calibration()
        if fitted and cfg.eval.calibrate:
            t = float(fitted["temperature"])
            preds.probs = run_task.apply_temperature(preds.probs, t)
        mapped = map_predictions(preds, lm, run_task, other_task)
        results = run.evaluation(f"external-{name}-{split}")
        results.root.mkdir(parents=True, exist_ok=True)
        monitor = Monitor(results.root / "tb", True, 0, 0, "off", purge=False)
        try:
            m = report(mapped, lm.task, split, run, results, monitor, 0, "none", cfg.eval.patient_agg)
        finally:
            monitor.close()
        record = {
            "shards": str(shards),
            "dataset": other.dataset,
            "split": split,
            "n": len(mapped.keys),
            "weights": loaded.weights,
            "common_task": lm.task.type,
            "mapping": lm.source,
            "metrics": {k: v for k, v in m.items() if isinstance(v, float)},
        }
        atomic.write_json(results.root / EXTERNAL, record)
        log.info("external %s %s (%d samples): %s -> %s", name, split, len(mapped.keys), m, results.root)
        return record
    finally:
        dist.destroy()


def _with_shards(cfg: Any, shards: str) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards))


def external_results(run_root: Path) -> list[dict[str, Any]]:
    """Every external validation of a run, as written (for its model card)."""
    import json

    return [json.loads(p.read_text()) for p in sorted((run_root / "evals").glob(f"external-*/{EXTERNAL}"))]
