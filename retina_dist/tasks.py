"""What is being learnt: the task owns the loss, the output activation and the metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from retina_dist import calibration, losses, metrics

if TYPE_CHECKING:
    from retina_dist.data.manifest import Manifest


@dataclass(frozen=True)
class Task:
    """``multihead``: several multi-class answers per sample (e.g. DR grade and OCT class), each
    head a softmax over its own columns, one cross-entropy each, summed. Its classes are
    ``head:class`` in column order; its target a row that is one-hot within each head."""

    type: str  # multiclass | multilabel | multihead
    classes: tuple[str, ...]
    label_smoothing: float = 0.0
    loss_name: str = "auto"  # auto | ce | bce | focal | hybrid
    pos_weight: torch.Tensor | None = None  # multilabel BCE, per class
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    heads: tuple[tuple[str, tuple[str, ...]], ...] = ()  # multihead: (head, its classes), column order

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        return self.type == "multilabel"

    @property
    def vector_target(self) -> bool:
        """Targets are rows of 0/1 (multi-label, and multi-head: one-hot per head), not an index."""
        return self.type in ("multilabel", "multihead")

    @property
    def groups(self) -> tuple[int, ...]:
        """Columns per head (empty unless multi-head): what each softmax spans."""
        return tuple(len(c) for _, c in self.heads)

    def head_columns(self) -> list[tuple[str, tuple[str, ...], slice]]:
        out, start = [], 0
        for name, classes in self.heads:
            out.append((name, classes, slice(start, start + len(classes))))
            start += len(classes)
        return out

    def apply_temperature(self, probs: np.ndarray, temperature: float) -> np.ndarray:
        return calibration.apply_temperature(probs, temperature, self.multilabel, self.groups)

    def fit_temperature(self, probs: np.ndarray, target: np.ndarray) -> float:
        return calibration.fit_temperature(probs, target, self.multilabel, self.groups)

    def confidence(self, probs: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, correct) pairs for calibration error and reliability: every column of a
        multi-label task; each sample's top class per head otherwise."""
        if self.multilabel:
            return probs.ravel(), target.ravel().astype(float)
        if self.heads:
            pairs = [
                (probs[:, s].max(1), (probs[:, s].argmax(1) == target[:, s].argmax(1)).astype(float))
                for _, _, s in self.head_columns()
            ]
            return np.concatenate([c for c, _ in pairs]), np.concatenate([k for _, k in pairs])
        return probs.max(1), (probs.argmax(1) == target).astype(float)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.heads:  # soft targets (one-hot, or mixed by mixup) per head: one loss each, summed
            return sum(
                (
                    F.cross_entropy(logits[:, s], target[:, s].float(), label_smoothing=self.label_smoothing)
                    for _, _, s in self.head_columns()
                ),
                torch.zeros((), device=logits.device),
            )
        kind = self.loss_name
        if not self.multilabel:
            if kind == "focal":
                return losses.softmax_focal(logits, target, self.focal_alpha, self.focal_gamma)
            if target.is_floating_point():  # soft targets from mixup/cutmix, already smoothed there
                return F.cross_entropy(logits, target)
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        pw = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        if kind == "focal":
            return losses.sigmoid_focal(logits, target, self.focal_alpha, self.focal_gamma)
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
        if kind == "hybrid":  # the ODIR recipe: 0.5 weighted BCE + 0.5 focal(alpha 0.3, gamma 2.5)
            return 0.5 * bce + 0.5 * losses.sigmoid_focal(logits, target, 0.3, 2.5)
        return bce

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.heads:
            return torch.cat([torch.softmax(logits[:, s], dim=1) for _, _, s in self.head_columns()], dim=1)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def metrics(self, target: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        if self.heads:
            return self._head_metrics(target, probs)
        if self.multilabel:
            return metrics.multilabel(target, probs, self.classes)
        return metrics.multiclass(target, probs, self.classes)

    def _head_metrics(self, target: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        """Each head's multi-class metrics under ``<head>_``, its full set under ``heads``; the
        calibration error over every head's top class; per-class F1 under ``head:class``."""
        out: dict[str, Any] = {"n": int(len(target)), "heads": {}, "per_class_f1": {}}
        for name, classes, s in self.head_columns():
            m = metrics.multiclass(target[:, s].argmax(1), probs[:, s], classes)
            out["heads"][name] = m
            for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "qwk"):
                out[f"{name}_{k}"] = m[k]
            out["per_class_f1"].update({f"{name}:{c}": v for c, v in m["per_class_f1"].items()})
        aurocs = [m["macro_auroc"] for m in out["heads"].values() if m["macro_auroc"] is not None]
        out["macro_auroc"] = float(np.mean(aurocs)) if aurocs else None
        out["ece"] = metrics.expected_calibration_error(*self.confidence(probs, target))
        return out

    def decide(self, probs: np.ndarray) -> list[str]:
        """The predicted class names of one sample: the argmax (per head), or every class at or
        above 0.5 (multi-label; the run's tuned thresholds are the predictor's)."""
        if self.heads:
            return [f"{name}:{classes[int(probs[s].argmax())]}" for name, classes, s in self.head_columns()]
        if self.multilabel:
            return [c for c, p in zip(self.classes, probs, strict=True) if p >= 0.5]
        return [self.classes[int(np.argmax(probs))]]

    def target_columns(self) -> list[str]:
        return [f"true_{c}" for c in self.classes] if self.vector_target else ["target"]


def build_task(manifest: Manifest, optim: Any = None, train_split: str = "train") -> Task:
    spec = manifest.task
    if spec["type"] not in ("multiclass", "multilabel", "binary", "multihead"):
        raise ValueError(f"manifest task type {spec['type']!r} is not supported")
    kind = "multiclass" if spec["type"] == "binary" else spec["type"]
    classes = tuple(spec["classes"])
    heads = tuple((name, tuple(c)) for name, c in spec.get("heads", {}).items())
    if kind == "multihead" and tuple(f"{h}:{c}" for h, cs in heads for c in cs) != classes:
        raise ValueError(f"manifest task: heads {dict(heads)} do not spell its classes {list(classes)}")
    if optim is None:
        return Task(kind, classes, heads=heads)
    pos_weight = None
    if kind == "multilabel" and (optim.pos_weight or optim.loss == "hybrid"):
        split = manifest.splits.get(train_split)
        pos_weight = losses.pos_weight_from_histogram(
            split.histogram if split else {}, split.count if split else 0, classes
        )
    if (
        optim.loss in ("ce",)
        and kind == "multilabel"
        or optim.loss in ("bce", "hybrid")
        and kind != "multilabel"
    ):
        from retina_dist.config import ConfigError

        raise ConfigError(f"optim.loss={optim.loss} does not fit a {kind} task")
    if kind == "multihead" and optim.loss not in ("auto", "ce"):
        from retina_dist.config import ConfigError

        raise ConfigError(
            f"optim.loss={optim.loss}: a multi-head task trains with one cross-entropy per head"
        )
    return Task(
        kind,
        classes,
        optim.label_smoothing,
        optim.loss,
        pos_weight,
        optim.focal_alpha,
        optim.focal_gamma,
        heads,
    )
