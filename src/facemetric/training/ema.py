"""An exponential moving average of a model's weights (``[train] ema_decay``).

After every optimiser step ``t = 1, 2, …``::

    d_t = min(decay, (1 + t) / (10 + t))
    θ̄_t = d_t · θ̄_{t−1} + (1 − d_t) · θ_t          θ̄_0 = θ_0

for every floating-point parameter and buffer (BatchNorm's running statistics included);
integer buffers (``num_batches_tracked``) are copied. The warm-up of ``d_t`` keeps the first
steps from being dominated by the random initialisation (the schedule of TensorFlow's
``ExponentialMovingAverage(num_updates=…)``). Averaging the iterates of SGD goes back to
Polyak & Juditsky (1992); the EMA of weights is standard practice in the Kaggle
metric-learning solutions and in image classification (e.g. Tan & Le 2019).

The average is kept in the weights' own dtype on the model's device, apart from the model;
:meth:`WeightAverage.state_dict` has the model's own keys, so a checkpoint stores it as
``"model"`` — what every consumer loads — and the raw weights the optimiser
works on as ``"model_raw"`` (exact resume needs both).
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    """The exponential moving average of ``model``'s weights (module docstring).

    Args:
        model: the model being trained (its current weights start the average).
        decay: the long-run decay ``d`` in ``(0, 1)``; 0.999 averages over about the last
            1,000 steps.

    Raises:
        ValueError: ``decay`` outside ``(0, 1)``.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def to(self, device: torch.device | str) -> WeightAverage:
        """Move the average to ``device`` (where the model trains); returns ``self``."""
        self.average = {k: v.to(device) for k, v in self.average.items()}
        return self

    def current_decay(self) -> float:
        """``d_t`` for the next update."""
        t = self.updates + 1
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (after an optimiser step)."""
        d = self.current_decay()
        for key, value in model.state_dict().items():
            avg = self.average[key]
            if avg.is_floating_point():
                avg.mul_(d).add_(value.detach().to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's keys (in the model's dtypes)."""
        return dict(self.average)

    def load(self, averaged: dict[str, torch.Tensor], updates: int) -> None:
        """Continue from a checkpoint: its averaged weights and update count.

        Raises:
            ValueError: the keys differ from the model's.
        """
        if set(averaged) != set(self.average):
            missing = sorted(set(self.average) - set(averaged))[:5]
            extra = sorted(set(averaged) - set(self.average))[:5]
            raise ValueError(
                f"the checkpoint's averaged weights do not fit this model (missing {missing}, "
                f"unexpected {extra}): was it written by another [model]?"
            )
        for key, value in averaged.items():
            self.average[key].copy_(value)
        self.updates = int(updates)


__all__ = ["WeightAverage"]
