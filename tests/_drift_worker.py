"""Run under torchrun with 2 gloo processes: shows the unfreeze-under-a-live-DDP-wrapper drift and that
`check_replicas_identical` catches it, and that re-wrapping after the phase change (what the trainer does) keeps
the replicas identical. Prints one line per case for the test to read."""

import sys

import torch
from torch import nn

from train.run_checkpoint import ReplicaDivergenceError, check_replicas_identical
from train.strategy import setup_strategy


def train_steps(model: nn.Module, wrapped: nn.Module, rank: int, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        inputs = torch.full((4, 4), float(rank + step + 1))  # different data on every rank
        wrapped(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> int:
    strategy = setup_strategy("ddp", "cpu")
    for rewrap in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        model[0].requires_grad_(False)  # phase 1: first layer frozen
        wrapped = strategy.wrap(model)
        train_steps(model, wrapped, strategy.rank)
        model[0].requires_grad_(True)  # phase 2: unfrozen
        if rewrap:
            wrapped = strategy.wrap(model)
        train_steps(model, wrapped, strategy.rank)
        try:
            check_replicas_identical(model, strategy)
            outcome = "identical"
        except ReplicaDivergenceError:
            outcome = "diverged"
        if strategy.is_main:
            print(f"rewrap={rewrap}: {outcome}", flush=True)
    strategy.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
