"""What is being learnt: the task owns the loss, the output activation and the metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retina_dist import metrics


@dataclass(frozen=True)
class Task:
    type: str  # multiclass | multilabel
    classes: tuple[str, ...]
    label_smoothing: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        return self.type == "multilabel"

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def metrics(self, target: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        if self.multilabel:
            return metrics.multilabel(target, probs, self.classes)
        return metrics.multiclass(target, probs, self.classes)

    def target_columns(self) -> list[str]:
        return [f"true_{c}" for c in self.classes] if self.multilabel else ["target"]


def build_task(manifest: dict[str, Any], label_smoothing: float = 0.0) -> Task:
    spec = manifest["task"]
    if spec["type"] not in ("multiclass", "multilabel", "binary"):
        raise ValueError(f"manifest task type {spec['type']!r} is not supported")
    kind = "multiclass" if spec["type"] == "binary" else spec["type"]
    return Task(kind, tuple(spec["classes"]), label_smoothing)
