"""Post-hoc calibration fitted on validation and applied to the other splits: temperature scaling
(one scalar, Guo et al. 2017) and, for multi-label tasks, a decision threshold per class."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

EPS = 1e-7


def to_logits(probs: np.ndarray, multilabel: bool) -> np.ndarray:
    p = np.clip(probs, EPS, 1 - EPS)
    return np.log(p / (1 - p)) if multilabel else np.log(p)  # softmax is shift-invariant: log p will do


def apply_temperature(probs: np.ndarray, temperature: float, multilabel: bool) -> np.ndarray:
    z = to_logits(probs, multilabel) / temperature
    if multilabel:
        return 1 / (1 + np.exp(-z))
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(probs: np.ndarray, target: np.ndarray, multilabel: bool) -> float:
    p = np.clip(probs, EPS, 1 - EPS)
    if multilabel:
        return float(-(target * np.log(p) + (1 - target) * np.log(1 - p)).mean())
    return float(-np.log(p[np.arange(len(target)), target.astype(int)]).mean())


def fit_temperature(probs: np.ndarray, target: np.ndarray, multilabel: bool) -> float:
    """The temperature minimising validation NLL: a log grid, then a finer one around the best."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 121))
    for _ in range(2):
        losses = [nll(apply_temperature(probs, t, multilabel), target, multilabel) for t in grid]
        best = int(np.argmin(losses))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        grid = np.linspace(lo, hi, 41)
    return float(
        grid[int(np.argmin([nll(apply_temperature(probs, t, multilabel), target, multilabel) for t in grid]))]
    )


def tune_thresholds(target: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per class, the threshold in 0.05..0.95 that maximises that class's F1 (0.5 without positives)."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    out = []
    for c in range(target.shape[1]):
        if not target[:, c].any():
            out.append(0.5)
            continue
        scores = [f1_score(target[:, c], probs[:, c] >= t, zero_division=0) for t in grid]
        out.append(float(grid[int(np.argmax(scores))]))
    return out
