"""The challenges' own scores, computed as their organisers compute them (``../shared/INTEROP.md``).

ODIR-2019 (``ODIR_evaluation.py``): truth and probabilities per patient x 8 columns, flattened; the
threshold is strictly greater than 0.5; kappa, micro F1 and ROC AUC of the flat vectors; the final
score is their mean. The organisers' code raises on an undefined AUC: here an undefined term is
``None`` with its reason under ``undefined``, and the final score is then undefined too.

RIADD 2021 (RFMiD): task 1 is the ROC AUC of ``Disease_Risk``; task 2 the mean of macro AUROC and
macro average precision over the disease columns only (``Disease_Risk`` excluded), leaving out
columns without a positive; the final score is the mean of the two tasks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

ODIR_CLASSES = ("N", "D", "G", "C", "A", "H", "M", "O")
RISK = "Disease_Risk"

Scores = dict[str, float | None]
Reasons = dict[str, str]


def one_class_reason(y: np.ndarray) -> str | None:
    """Why ROC AUC of ``y`` is undefined (a single class present), or None when it is defined."""
    pos = int(y.sum())
    if pos == 0:
        return f"no positive among {len(y)}"
    if pos == len(y):
        return f"no negative among {len(y)}"
    return None


def is_odir(classes: tuple[str, ...]) -> bool:
    return tuple(classes) == ODIR_CLASSES


def is_riadd(classes: tuple[str, ...]) -> bool:
    return RISK in classes and len(classes) > 1


def odir(target: np.ndarray, probs: np.ndarray) -> tuple[Scores, Reasons]:
    """``odir_kappa``, ``odir_f1``, ``odir_auc``, ``odir_final`` of patient-level rows (N x 8), and
    the reason for each undefined one."""
    flat_t = np.asarray(target).astype(int).ravel()
    flat_p = np.asarray(probs, dtype=np.float64).ravel()
    flat_pred = (flat_p > 0.5).astype(int)  # the official `pr > th`: exactly 0.5 is negative
    out: Scores = {}
    undefined: Reasons = {}
    if len(np.unique(np.concatenate([flat_t, flat_pred]))) < 2:
        out["odir_kappa"] = None  # chance agreement is 1: kappa is 0/0
        undefined["odir_kappa"] = "truth and thresholded predictions hold one and the same value"
    else:
        out["odir_kappa"] = float(skm.cohen_kappa_score(flat_t, flat_pred))
    out["odir_f1"] = float(skm.f1_score(flat_t, flat_pred, average="micro"))
    reason = one_class_reason(flat_t)
    if reason:
        out["odir_auc"] = None
        undefined["odir_auc"] = f"the flattened truth has {reason} values (the official scorer raises)"
    else:
        out["odir_auc"] = float(skm.roc_auc_score(flat_t, flat_p))
    _final(out, undefined, "odir_final", ("odir_kappa", "odir_f1", "odir_auc"))
    return out, undefined


def riadd(
    target: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]
) -> tuple[Scores, Reasons, dict[str, str]]:
    """``riadd_risk_auroc``, ``riadd_auroc``, ``riadd_map``, ``riadd_multilabel``, ``riadd_final``;
    the reasons for undefined scores; the disease columns left out of task 2 and why."""
    target = np.asarray(target).astype(int)
    risk = classes.index(RISK)
    out: Scores = {}
    undefined: Reasons = {}
    reason = one_class_reason(target[:, risk])
    if reason:
        out["riadd_risk_auroc"] = None
        undefined["riadd_risk_auroc"] = f"{RISK} has {reason}"
    else:
        out["riadd_risk_auroc"] = float(skm.roc_auc_score(target[:, risk], probs[:, risk]))
    excluded: dict[str, str] = {}
    aurocs, aps = [], []
    for i, c in enumerate(classes):
        if i == risk:
            continue
        col = target[:, i]
        if (why := one_class_reason(col)) is not None:
            excluded[c] = why  # no positive: both terms undefined; no negative: AUROC undefined
            continue
        aurocs.append(skm.roc_auc_score(col, probs[:, i]))
        aps.append(skm.average_precision_score(col, probs[:, i]))
    if aurocs:
        mean_auroc, mean_ap = float(np.mean(aurocs)), float(np.mean(aps))
        out["riadd_auroc"], out["riadd_map"] = mean_auroc, mean_ap
        out["riadd_multilabel"] = (mean_auroc + mean_ap) / 2
    else:
        out["riadd_auroc"] = out["riadd_map"] = out["riadd_multilabel"] = None
        for k in ("riadd_auroc", "riadd_map", "riadd_multilabel"):
            undefined[k] = "no disease column has both a positive and a negative"
    _final(out, undefined, "riadd_final", ("riadd_risk_auroc", "riadd_multilabel"))
    return out, undefined, excluded


def _final(out: Scores, undefined: Reasons, name: str, parts: tuple[str, ...]) -> None:
    missing = [p for p in parts if out[p] is None]
    if missing:
        out[name] = None
        undefined[name] = f"{', '.join(missing)} undefined"
    else:
        out[name] = float(np.mean([out[p] for p in parts]))


def challenge_scores(target: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    """The scores of whichever challenge ``classes`` belong to (none for other label sets), with
    ``undefined`` and ``excluded`` entries to merge into the metrics."""
    out: dict[str, Any] = {}
    undefined: Reasons = {}
    excluded: dict[str, dict[str, str]] = {}
    if is_odir(classes):
        scores, why = odir(target, probs)
        out.update(scores)
        undefined.update(why)
    if is_riadd(classes):
        scores, why, left_out = riadd(target, probs, classes)
        out.update(scores)
        undefined.update(why)
        excluded["riadd_multilabel"] = {RISK: "task 1 column, not a disease", **left_out}
    return {**out, "undefined": undefined, "excluded": excluded}
