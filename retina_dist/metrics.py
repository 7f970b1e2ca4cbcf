"""Metrics on gathered predictions, computed once on rank 0 with scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


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
        "qwk": float(skm.cohen_kappa_score(target, pred, labels=labels, weights="quadratic")),
        "ece": expected_calibration_error(probs.max(1), (pred == target).astype(float)),
        "confusion_matrix": skm.confusion_matrix(target, pred, labels=labels).tolist(),
    }


def multilabel(
    target: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], threshold: float = 0.5
) -> dict[str, Any]:
    pred = (probs >= threshold).astype(int)
    target = target.astype(int)
    f1 = skm.f1_score(target, pred, average=None, zero_division=0)
    auc = {c: _auroc(target[:, i], probs[:, i]) for i, c in enumerate(classes)}
    defined = [v for v in auc.values() if v is not None]
    ap = [
        float(skm.average_precision_score(target[:, i], probs[:, i]))
        for i in range(len(classes))
        if target[:, i].any()
    ]
    flat_t, flat_p, flat_pred = target.ravel(), probs.ravel(), pred.ravel()
    # ODIR-5K challenge score: kappa, F1 and AUC over all (sample, label) pairs at the 0.5 threshold
    odir_parts = [
        float(skm.cohen_kappa_score(flat_t, flat_pred)),
        float(skm.f1_score(flat_t, flat_pred, average="micro", zero_division=0)),
        _auroc(flat_t, flat_p) or 0.0,
    ]
    out = {
        "n": int(len(target)),
        "micro_f1": float(skm.f1_score(target, pred, average="micro", zero_division=0)),
        "macro_f1": float(np.mean(f1)),
        "per_class_f1": {c: float(v) for c, v in zip(classes, f1, strict=True)},
        "auroc": auc,
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "mAP": float(np.mean(ap)) if ap else None,
        "odir_score": float(np.mean(odir_parts)),
        "odir_kappa_f1_auc": odir_parts,
        "ece": expected_calibration_error(flat_p, flat_t.astype(float)),
    }
    macro_auroc, m_ap = out["macro_auroc"], out["mAP"]
    if isinstance(macro_auroc, float) and isinstance(m_ap, float):
        out["riadd_score"] = (macro_auroc + m_ap) / 2  # RIADD: mean(macro AUROC, mAP)
    if "Disease_Risk" in classes:
        out["disease_risk_auroc"] = auc["Disease_Risk"]
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
