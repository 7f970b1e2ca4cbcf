"""Evaluation pictures: confusion matrices and ROC curves, as matplotlib figures (saved and logged).

Figures are made with matplotlib's object API (``Figure``), never pyplot: no backend is chosen, no
global figure registry fills up, and importing this module changes nothing for anyone else."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve


def confusion(cm: np.ndarray, classes: tuple[str, ...], normalise: bool, title: str) -> Figure:
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalise else cm
    fig = Figure(figsize=(1.2 + 0.8 * len(classes), 1 + 0.7 * len(classes)), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else None)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            txt = f"{shown[i, j]:.2f}" if normalise else f"{int(cm[i, j])}"
            ax.text(
                j,
                i,
                txt,
                ha="center",
                va="center",
                color="white" if shown[i, j] > shown.max() / 2 else "black",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def roc(target_onehot: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], title: str) -> Figure:
    fig = Figure(figsize=(5, 4.5), dpi=110)
    ax = fig.subplots()
    for i, c in enumerate(classes):
        y = target_onehot[:, i]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {np.trapezoid(tpr, fpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def pr(target_onehot: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], title: str) -> Figure:
    fig = Figure(figsize=(5, 4.5), dpi=110)
    ax = fig.subplots()
    for i, c in enumerate(classes):
        y = target_onehot[:, i]
        if y.sum() > 0:
            prec, rec, _ = precision_recall_curve(y, probs[:, i])
            ax.plot(rec, prec, label=f"{c} (prevalence {y.mean():.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def reliability(confidence: np.ndarray, correct: np.ndarray, title: str, bins: int = 15) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with bin counts."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    centres = (edges[:-1] + edges[1:]) / 2
    acc = np.array([correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    count = np.bincount(idx, minlength=bins)
    fig = Figure(figsize=(4.5, 5), dpi=110)
    (ax, axc) = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.bar(centres, np.nan_to_num(acc), width=1 / bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    axc.bar(centres, count, width=1 / bins, color="grey")
    axc.set_xlabel("confidence")
    axc.set_ylabel("samples")
    fig.tight_layout()
    return fig


def f1_bars(per_class: dict[str, float], title: str) -> Figure:
    fig = Figure(figsize=(1.5 + 0.45 * len(per_class), 3.2), dpi=110)
    ax = fig.subplots()
    ax.bar(list(per_class), list(per_class.values()), color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    """Let go of a figure's drawing memory now (nothing registers it, so this is all there is)."""
    fig.clear()
