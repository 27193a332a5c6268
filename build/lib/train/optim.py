"""Optimizer and learning-rate schedule from the `optim` config (the torchvision detection recipe by default)."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule, when a reference batch is given: lr * global_batch / reference_batch_size."""
    if cfg.reference_batch_size is None:
        return cfg.lr
    return cfg.lr * global_batch / cfg.reference_batch_size


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """An optimizer over *all* parameters, frozen ones included.

    torch optimizers skip parameters whose .grad is None and the loop zeroes grads with set_to_none, so frozen
    parameters are neither updated nor decayed. A freezing-phase change therefore needs no new parameter groups,
    and no optimizer state (momentum, Adam moments) is lost for parameters that keep training.
    """
    params = list(model.parameters())
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def build_lr_schedule(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then multistep (milestones in epochs), cosine (to zero at total_steps) or constant."""
    milestone_steps = [epoch * steps_per_epoch for epoch in cfg.milestones]

    def factor(step: int) -> float:
        warmup = 1.0
        if step < cfg.warmup_steps:
            alpha = step / cfg.warmup_steps
            warmup = cfg.warmup_factor * (1 - alpha) + alpha
        if cfg.schedule == "multistep":
            decay = cfg.gamma ** sum(step >= milestone for milestone in milestone_steps)
        elif cfg.schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        else:
            decay = 1.0
        return warmup * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
