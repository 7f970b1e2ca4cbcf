"""What is being learnt: the task owns the loss, the output activation and the metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from retina_dist import losses, metrics

if TYPE_CHECKING:
    from retina_dist.data.manifest import Manifest


@dataclass(frozen=True)
class Task:
    type: str  # multiclass | multilabel
    classes: tuple[str, ...]
    label_smoothing: float = 0.0
    loss_name: str = "auto"  # auto | ce | bce | focal | hybrid
    pos_weight: torch.Tensor | None = None  # multilabel BCE, per class
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        return self.type == "multilabel"

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
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
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def metrics(self, target: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        if self.multilabel:
            return metrics.multilabel(target, probs, self.classes)
        return metrics.multiclass(target, probs, self.classes)

    def target_columns(self) -> list[str]:
        return [f"true_{c}" for c in self.classes] if self.multilabel else ["target"]


def build_task(manifest: Manifest, optim: Any = None, train_split: str = "train") -> Task:
    spec = manifest.task
    if spec["type"] not in ("multiclass", "multilabel", "binary"):
        raise ValueError(f"manifest task type {spec['type']!r} is not supported")
    kind = "multiclass" if spec["type"] == "binary" else spec["type"]
    classes = tuple(spec["classes"])
    if optim is None:
        return Task(kind, classes)
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
    return Task(
        kind, classes, optim.label_smoothing, optim.loss, pos_weight, optim.focal_alpha, optim.focal_gamma
    )
