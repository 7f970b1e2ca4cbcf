"""Patient-level results, a view of an exact-once image-level evaluation: each patient's images'
calibrated probabilities aggregated by ``eval.patient_agg`` (``mean``, or ``max`` per class), the
patient's label taken from its images (multi-label: a class is present when any image has it;
single-label: the label most of its images carry, a tie going to the higher class, i.e. the worse
grade), then the task's own metrics over patients. A split where every patient has one image has no
patient level of its own (the image results are the patient results)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retina_dist.tasks import Task

RULES = ("mean", "max", "none")


@dataclass
class PatientPredictions:
    patients: list[str]
    images: np.ndarray  # images per patient
    target: np.ndarray
    probs: np.ndarray


def aggregate(
    patients: list[str], target: np.ndarray, probs: np.ndarray, task: Task, rule: str
) -> PatientPredictions | None:
    """Per-patient targets and probabilities; None when ``rule`` is ``none``, the shards name no
    patients, or no patient has more than one image."""
    if rule == "none" or not patients:
        return None
    if rule not in RULES:
        raise ValueError(f"eval.patient_agg={rule!r}: one of {', '.join(RULES)}")
    groups: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        groups.setdefault(patient, []).append(i)
    if len(groups) == len(patients):
        return None
    names = sorted(groups)
    agg_probs, agg_target = [], []
    for name in names:
        idx = groups[name]
        agg_probs.append(_combine(probs[idx], rule, task))
        agg_target.append(_majority(target[idx], task))
    return PatientPredictions(
        names, np.array([len(groups[n]) for n in names]), np.array(agg_target), np.stack(agg_probs)
    )


def _combine(mine: np.ndarray, rule: str, task: Task) -> np.ndarray:
    if rule == "mean":
        return mine.mean(0)
    agg = mine.max(0)
    if task.multilabel:
        return agg
    parts = [(slice(None))] if not task.heads else [s for _, _, s in task.head_columns()]
    for s in parts:  # still a distribution over the classes (of each head)
        agg[s] = agg[s] / agg[s].sum()
    return agg


def _majority(t: np.ndarray, task: Task) -> Any:
    """The class most of the patient's images carry, a tie going to the higher class (the worse
    grade); per head for a multi-head task; any image's classes for a multi-label one."""
    if task.multilabel:
        return t.max(0)
    if task.heads:
        row = np.zeros(task.num_classes, dtype=t.dtype)
        for _, classes, s in task.head_columns():
            row[s.start + _majority_index(t[:, s].argmax(1), len(classes))] = 1
        return row
    return _majority_index(t.astype(int), task.num_classes)


def _majority_index(indices: np.ndarray, n: int) -> int:
    counts = np.bincount(indices, minlength=n)
    return int(np.flatnonzero(counts == counts.max())[-1])


def write(pp: PatientPredictions, task: Task, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "images", *task.target_columns(), *[f"prob_{c}" for c in task.classes]])
        for i, name in enumerate(pp.patients):
            t = pp.target[i]
            tcols = [int(v) for v in t] if task.vector_target else [int(t)]
            w.writerow([name, int(pp.images[i]), *tcols, *[f"{p:.6f}" for p in pp.probs[i]]])
