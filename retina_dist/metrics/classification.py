"""Metrics on gathered predictions, computed once on rank 0 with scikit-learn. A macro mean over
classes leaves out the classes where its term is undefined; ``excluded`` names them and says why."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

from retina_dist.metrics import challenges


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    return float(skm.roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None  # undefined with one class


def multiclass(target: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    labels = list(range(len(classes)))
    pred = probs.argmax(1)
    f1 = skm.f1_score(target, pred, labels=labels, average=None, zero_division=0)
    auc = {c: _auroc((target == i).astype(int), probs[:, i]) for i, c in enumerate(classes)}
    defined = [v for v in auc.values() if v is not None]
    return {
        "n": int(len(target)),
        "accuracy": float(skm.accuracy_score(target, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(target, pred)),
        "macro_f1": float(np.mean(f1)),
        "per_class_f1": {c: float(v) for c, v in zip(classes, f1, strict=True)},
        "auroc_ovr": auc,
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "excluded": {"macro_auroc": _left_out(np.eye(len(classes), dtype=int)[target], classes, auroc=True)},
        "qwk": float(skm.cohen_kappa_score(target, pred, labels=labels, weights="quadratic")),
        "ece": expected_calibration_error(probs.max(1), (pred == target).astype(float)),
        "confusion_matrix": skm.confusion_matrix(target, pred, labels=labels).tolist(),
    }


def multilabel(
    target: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], threshold: float = 0.5
) -> dict[str, Any]:
    """Per-label and pooled scores at ``probs > threshold`` (strictly, as ODIR's official scorer
    thresholds), plus the challenge's own scores when ``classes`` are ODIR's or RFMiD's."""
    pred = (probs > threshold).astype(int)
    target = target.astype(int)
    # Column by column and over the flattened pairs: sklearn reads a one-label (N x 1) indicator
    # as a binary column vector and would score both of its values.
    f1 = np.array([skm.f1_score(target[:, i], pred[:, i], zero_division=0) for i in range(len(classes))])
    auc = {c: _auroc(target[:, i], probs[:, i]) for i, c in enumerate(classes)}
    defined = [v for v in auc.values() if v is not None]
    ap = [
        float(skm.average_precision_score(target[:, i], probs[:, i]))
        for i in range(len(classes))
        if target[:, i].any()
    ]
    flat_t, flat_p = target.ravel(), probs.ravel()
    challenge = challenges.challenge_scores(target, probs, classes)
    out = {
        "n": int(len(target)),
        "micro_f1": float(skm.f1_score(target.ravel(), pred.ravel(), zero_division=0)),
        "macro_f1": float(np.mean(f1)),
        "per_class_f1": {c: float(v) for c, v in zip(classes, f1, strict=True)},
        "auroc": auc,
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "mAP": float(np.mean(ap)) if ap else None,
        "ece": expected_calibration_error(flat_p, flat_t.astype(float)),
        **{k: v for k, v in challenge.items() if k not in ("undefined", "excluded")},
        "excluded": {
            "macro_auroc": _left_out(target, classes, auroc=True),
            "mAP": _left_out(target, classes, auroc=False),
            **challenge["excluded"],
        },
        "undefined": challenge["undefined"],
    }
    return out


def _left_out(onehot: np.ndarray, classes: tuple[str, ...], auroc: bool) -> dict[str, str]:
    """The classes a macro mean leaves out, and why: AUROC needs both a positive and a negative,
    average precision a positive."""
    out = {}
    for i, c in enumerate(classes):
        why = challenges.one_class_reason(onehot[:, i])
        if why and (auroc or why.startswith("no positive")):
            out[c] = why
    return out


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x bin share."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)
