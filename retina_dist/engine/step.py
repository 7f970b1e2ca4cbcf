"""One optimizer step: the unit the Trainer, ``bench step`` and the tests all call.

``micro_batches`` is consumed lazily, so the next micro-batch is fetched (and its pixels moved to
the device) while the strategy waits on nothing: the step reads no value back from the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from retina_dist.engine.amp import autocast
from retina_dist.engine.strategy import Strategy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepOutput:
    loss: torch.Tensor  # on the device: the mean loss over the step's micro-batches
    grad_norm: torch.Tensor  # on the device: the pre-clip gradient norm
    samples: int  # samples this rank trained on


@dataclass
class TrainStep:
    strategy: Strategy
    loss_fn: LossFn
    accum_steps: int = 1
    amp: str = "none"
    max_grad_norm: float = 1.0

    def __call__(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> StepOutput:
        s, accum = self.strategy, self.accum_steps
        loss_sum: torch.Tensor | None = None
        samples = 0
        for i, (x, y) in enumerate(micro_batches):
            with s.accumulating(last=i == accum - 1), autocast(x.device, self.amp):
                loss = self.loss_fn(s.model(x), y) / accum
            s.backward(loss)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            samples += x.shape[0]
        if loss_sum is None or samples == 0:
            raise ValueError("train step: no micro-batch given")
        norm = s.clip_and_step(self.max_grad_norm)
        return StepOutput(loss_sum, norm, samples)
