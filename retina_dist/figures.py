"""Evaluation pictures: confusion matrices and ROC curves, as matplotlib figures (saved and logged)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def confusion(cm: np.ndarray, classes: tuple[str, ...], normalise: bool, title: str) -> Figure:
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalise else cm
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(classes), 1 + 0.7 * len(classes)), dpi=110)
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
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=110)
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


def close(fig: Figure) -> None:
    plt.close(fig)
