"""Layer-freezing schedules: which parameters train in which phase of training.

A schedule is the list of `FreezePhase`s from the config. A pattern is a module-name prefix with a dot
boundary ("backbone.body.layer1" covers "backbone.body.layer1.0.conv1.weight", not "backbone.body.layer10.*");
"*" covers everything. In a phase, a parameter trains iff it matches a `train` pattern and no `frozen` one.

Under DDP the wrapper must be rebuilt after every `apply_phase` that changes the trainable set, on all
ranks at the same point. DistributedDataParallel registers its gradient hooks and all-reduce buckets only
for the parameters that have requires_grad=True when it is constructed, and never looks again:
- a parameter frozen later still belongs to a bucket that waits for its gradient, so the next backward
  fails with "Expected to have finished reduction in the prior iteration..." (find_unused_parameters=True
  would hide this, at the cost of an autograd-graph walk every step);
- a parameter unfrozen later was never registered, so its gradients are never all-reduced and the
  replicas silently drift apart.
So the loop applies the phase to the unwrapped model, then wraps it again (and gives the optimizer the
new trainable set, or relies on it skipping parameters whose .grad is None).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from train.config import FreezePhase, check_phase_order


def matches(name: str, pattern: str) -> bool:
    """Whether the parameter (or module) `name` lies under the module-name prefix `pattern`."""
    return pattern == "*" or name == pattern or name.startswith(pattern + ".")


def is_trainable(name: str, phase: FreezePhase) -> bool:
    return any(matches(name, p) for p in phase.train) and not any(matches(name, p) for p in phase.frozen)


def validate_schedule(model: nn.Module, phases: Sequence[FreezePhase]) -> None:
    """Check the schedule against the (unwrapped) model before training starts.

    Every pattern must match at least one parameter, every phase must train something, and the phases must
    be ordered as `check_phase_order` requires. Raises ValueError naming the phase and the pattern.
    """
    check_phase_order(phases)
    names = [name for name, _ in model.named_parameters()]
    for index, phase in enumerate(phases):
        for pattern in [*phase.train, *phase.frozen]:
            if not any(matches(name, pattern) for name in names):
                raise ValueError(
                    f"freeze phase {index} ('{phase.name}'): pattern '{pattern}' matches no parameter of "
                    f"the model{_suggestion(pattern, names)}; its top-level modules with parameters are: "
                    f"{', '.join(dict.fromkeys(name.split('.')[0] for name in names))}"
                )
        if not any(is_trainable(name, phase) for name in names):
            raise ValueError(f"freeze phase {index} ('{phase.name}') leaves no parameter to train")


def phase_at(phases: Sequence[FreezePhase], epoch: int, step: int) -> int | None:
    """Index of the phase active at `epoch` and optimizer step `step` (both from 0); None without phases."""
    active = None
    for index, phase in enumerate(phases):
        start, now = (phase.start_epoch, epoch) if phase.start_epoch is not None else (phase.start_step, step)
        if start <= now:
            active = index
    return active


def apply_phase(model: nn.Module, phase: FreezePhase | None) -> int:
    """Set requires_grad on every parameter for `phase` (None: all train); returns the trainable count.

    Call it on the unwrapped model, then rebuild the DDP wrapper (see the module docstring).
    """
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(phase is None or is_trainable(name, phase))
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable


@torch.no_grad()
def freeze_batchnorm(module: nn.Module, eps: float | None = None) -> int:
    """Replace every nn.BatchNorm2d under `module` by a FrozenBatchNorm2d with the same statistics and
    affine parameters, in place; returns how many were replaced. Their eps is each layer's own, or `eps`.

    torchvision's builders use FrozenBatchNorm2d only for pretrained weights, and train/model.py builds every
    model without them (then loads its weights). With 2 images per GPU, batch statistics are too noisy to train
    on, so fine-tuning keeps the stored ones. Call it before loading a torchvision checkpoint: those were saved
    from frozen layers and have no `num_batches_tracked` entries.
    """
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            if child.running_mean is None or child.running_var is None:
                raise ValueError(f"cannot freeze BatchNorm2d '{name}': it tracks no running statistics")
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps if eps is None else eps)
            frozen = frozen.to(child.running_mean.device)
            if child.affine:
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
            replaced += 1
        else:
            replaced += freeze_batchnorm(child, eps)
    return replaced


def _suggestion(pattern: str, parameter_names: list[str]) -> str:
    """' (did you mean 'backbone.body.layer1'?)': the closest child of the deepest module named, or ''."""
    parts = pattern.split(".")
    paths = [name.split(".") for name in parameter_names]
    for depth in range(len(parts) - 1, -1, -1):
        parent = parts[:depth]
        children = sorted({path[depth] for path in paths if path[:depth] == parent and len(path) > depth})
        if children:
            close = difflib.get_close_matches(parts[depth], children, n=1)
            return f" (did you mean '{'.'.join([*parent, *close])}'?)" if close else ""
    return ""
