"""Post-hoc calibration fitted on validation and applied to the other splits: temperature scaling
(one scalar, Guo et al. 2017) and, for multi-label tasks, a decision threshold per class.

``groups`` (multi-head tasks): the column counts of each head, a softmax each; one temperature for
all, as the heads share the features it corrects."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

EPS = 1e-7


def to_logits(probs: np.ndarray, multilabel: bool) -> np.ndarray:
    p = np.clip(probs, EPS, 1 - EPS)
    return np.log(p / (1 - p)) if multilabel else np.log(p)  # softmax is shift-invariant: log p will do


def apply_temperature(
    probs: np.ndarray, temperature: float, multilabel: bool, groups: tuple[int, ...] = ()
) -> np.ndarray:
    z = to_logits(probs, multilabel) / temperature
    if multilabel:
        return 1 / (1 + np.exp(-z))
    return np.concatenate([_softmax(part) for part in _split(z, groups)], axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _split(a: np.ndarray, groups: tuple[int, ...]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(groups)[:-1], axis=1) if groups else [a]


def nll(probs: np.ndarray, target: np.ndarray, multilabel: bool, groups: tuple[int, ...] = ()) -> float:
    """``target``: class indices, or multi-hot rows (multi-label; one-hot per head with ``groups``)."""
    p = np.clip(probs, EPS, 1 - EPS)
    if multilabel:
        return float(-(target * np.log(p) + (1 - target) * np.log(1 - p)).mean())
    if groups:
        return sum(
            nll(pp, tt.argmax(1), False)
            for pp, tt in zip(_split(p, groups), _split(target, groups), strict=True)
        )
    return float(-np.log(p[np.arange(len(target)), target.astype(int)]).mean())


def fit_temperature(
    probs: np.ndarray, target: np.ndarray, multilabel: bool, groups: tuple[int, ...] = ()
) -> float:
    """The temperature minimising validation NLL: a log grid, then a finer one around the best."""

    def loss(t: float) -> float:
        return nll(apply_temperature(probs, t, multilabel, groups), target, multilabel, groups)

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 121))
    for _ in range(2):
        best = int(np.argmin([loss(t) for t in grid]))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        grid = np.linspace(lo, hi, 41)
    return float(grid[int(np.argmin([loss(t) for t in grid]))])


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
