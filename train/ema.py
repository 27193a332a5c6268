"""An exponential moving average (EMA) of the model's weights: what a run evaluates and deploys when
train.ema_decay is set.

The average covers the whole state dict of the unwrapped model (parameters and buffers, so BatchNorm statistics
too), kept in fp32 beside it on its device, and moves once per optimizer step that updated the weights (never
per micro-batch, never on a skipped non-finite step). Its decay warms up as in Ultralytics' ModelEMA,
`decay * (1 - exp(-updates / tau))`: early weights, far from the optimum, fade out fast, and the average
converges to its full horizon after a few tau optimizer steps. Integer buffers (BatchNorm's
num_batches_tracked) are copied, not averaged.

Under DDP the parameters are the same on every rank after each step, so every rank's average of them agrees
without any collective. BatchNorm's running statistics are not: each rank updates its own in the forward pass
(DDP broadcasts rank 0's again at the next one), so their averages drift apart. They are made rank 0's on every
rank (`share_rank0_buffers`) where they are read, before each evaluation and checkpoint, never per step; rank 0's
average, the one saved, never takes anything from the others, so resume stays bitwise. The run checkpoint's
replica check confirms that the averages agree.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from train.strategy import Strategy


class ModelEma:
    """fp32 moving average of `model`'s state dict, starting from its current weights."""

    def __init__(self, model: nn.Module, decay: float, tau: float):
        self.decay, self.tau = decay, tau
        self.updates = 0
        self.weights = {name: _fp32_copy(value) for name, value in model.state_dict().items()}
        buffer_names = {name for name, _ in model.named_buffers()}
        self._buffers = [value for name, value in self.weights.items() if name in buffer_names]

    def decay_at(self, updates: int) -> float:
        """The decay of update number `updates` (from 1); tau 0 means no warm-up."""
        return self.decay if self.tau == 0 else self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights: average += (1 - decay) * (weights - average).

        lerp leaves an average that equals the weights (a frozen parameter) bitwise unchanged.
        """
        self.updates += 1
        current = model.state_dict()
        averages, values = [], []
        for name, average in self.weights.items():
            if average.is_floating_point():
                averages.append(average)
                values.append(current[name].to(average.dtype))
            else:
                average.copy_(current[name])
        # one fused kernel per device and dtype instead of one per tensor, as torch's optimizers do
        torch._foreach_lerp_(averages, values, 1.0 - self.decay_at(self.updates))

    def share_rank0_buffers(self, strategy: Strategy) -> None:
        """Collective: rank 0's averaged buffers on every rank (see the module's docstring)."""
        strategy.broadcast_tensors(self._buffers)

    @torch.no_grad()
    def restart_from(self, model: nn.Module) -> None:
        """Start over from `model`'s weights, as if just built (a resume from a run without an EMA)."""
        for name, average in self.weights.items():
            average.copy_(model.state_dict()[name])
        self.updates = 0

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Restore an average saved from `weights` (the same keys) after `updates` updates, bitwise."""
        if weights.keys() != self.weights.keys():
            raise ValueError(f"EMA weights do not fit the model: {sorted(weights.keys() ^ self.weights.keys())}")
        for name, average in self.weights.items():
            average.copy_(weights[name])
        self.updates = updates


def _fp32_copy(value: torch.Tensor) -> torch.Tensor:
    copy = value.detach().clone()
    return copy.float() if copy.is_floating_point() else copy
