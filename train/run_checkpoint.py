"""The run's checkpoints: what exact resume needs, gathered from every rank, written by rank 0, and read back.

A run checkpoint (the file itself is train/checkpoint.py's) holds "model" (the deployable weights: the EMA's
with train.ema_decay, else the trained weights), "training_model" (the trained weights, which training resumes
from, when "model" is the EMA; else None), "ema_updates" (the EMA's update count; None without one),
"optimizer", "lr_schedule", "scaler" (None without fp16), "progress" (a `Progress` as a dict), "rng" (every
rank's generator states, by rank), "replica_hashes" (every rank's hash of its parameters and EMA),
"world_size", "categories", "test_metrics" (None until the test split was evaluated on the "model" weights),
"config" and "version". So whatever loads "model" (train/model.py: model_from_checkpoint, starting weights
from a file) gets the weights that were evaluated. Saving is collective, so the trainer saves only at step and
epoch boundaries, where every rank is at the same place; `resume_run` reads the same keys back.
"""

from __future__ import annotations

import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from common import __version__
from data_prep.class_list import ClassList
from train.checkpoint import (
    best_checkpoint_path,
    capture_rng_state,
    latest_valid_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_path,
    tensor_hash,
)
from train.config import Config, config_to_dict
from train.ema import ModelEma
from train.metrics import MetricsLogger
from train.strategy import Strategy

# Test-only: "RANK:STEP" makes that rank die hard (SIGKILL, as a crashed machine would) on torchrun's first
# attempt, just before the checkpoint of optimizer step STEP; the restarted group must resume from the one before.
KILL_BEFORE_CHECKPOINT_ENV = "TRAIN_KILL_BEFORE_CHECKPOINT"


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint and restored on resume."""

    epoch: int = 0
    step: int = 0  # optimizer steps done
    samples_in_epoch: int = 0  # samples this rank consumed in the current epoch (the same on every rank)
    images_seen: int = 0  # by the whole job
    phase: int | None = None
    best_ap: float = -1.0
    nonfinite_in_a_row: int = 0
    # early stopping (train.patience): validations since the AP last rose by more than train.min_delta, and
    # the AP of that rise, which the next one is measured from
    evals_since_improvement: int = 0
    ap_at_last_improvement: float = -1.0


class ReplicaDivergenceError(RuntimeError):
    """DDP replicas no longer hold the same weights (the hazard of changing requires_grad under a live wrapper)."""


class NonFiniteWeightsError(RuntimeError):
    """The weights about to be saved are not finite: the run stops and the last checkpoint stays the newest."""


def check_replicas_identical(model: nn.Module, strategy: Strategy, ema: ModelEma | None = None) -> list[str]:
    """Collective: every rank's hash of its parameters (and EMA, if any); raises when they differ, which DDP
    alone never reports."""
    held = dict(model.named_parameters())
    replica_hashes = strategy.all_gather_object(tensor_hash(held if ema is None else [held, ema.weights]))
    if len(set(replica_hashes)) > 1:
        raise ReplicaDivergenceError(
            f"model replicas differ across ranks ({replica_hashes}): some gradients were not all-reduced"
        )
    return replica_hashes


class RunCheckpointer:
    """Saves the run: every rank contributes its RNG state and parameter hash, rank 0 writes atomically.

    `model` is the unwrapped model (its state_dict keys carry no DDP `module.` prefix); `ema` its average, if any.
    """

    def __init__(self, cfg: Config, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_schedule: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                 classes: ClassList, logger: MetricsLogger, ema: ModelEma | None = None):
        self.cfg, self.strategy, self.model, self.ema = cfg, strategy, model, ema
        self.optimizer, self.lr_schedule, self.scaler = optimizer, lr_schedule, scaler
        self.classes, self.logger = classes, logger
        self.run_dir = Path(cfg.run_dir)
        self._kill_at_step = _kill_step_from_env(strategy.rank)

    def gather_state(self, progress: Progress, test_metrics: dict[str, float] | None = None) -> dict:
        """Collective: the checkpoint dict (on every rank; only rank 0 writes it)."""
        rng_states = self.strategy.all_gather_object(capture_rng_state())
        if self.ema is not None:
            self.ema.share_rank0_buffers(self.strategy)
        replica_hashes = check_replicas_identical(self.model, self.strategy, self.ema)
        trained = self.model.state_dict()
        return {
            "model": trained if self.ema is None else self.ema.weights,
            "training_model": None if self.ema is None else trained,
            "ema_updates": None if self.ema is None else self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": asdict(progress),
            "rng": rng_states,
            "replica_hashes": replica_hashes,
            "world_size": self.strategy.world_size,
            "categories": self.classes.to_json(),
            "test_metrics": test_metrics,
            "config": config_to_dict(self.cfg),
            "version": __version__,
        }

    def save(self, progress: Progress, best: bool = False, test_metrics: dict[str, float] | None = None) -> None:
        """Collective: checkpoint-{step}.pt (pruned to checkpoint.keep_last) or best.pt, then a barrier."""
        if progress.step == self._kill_at_step and not best:
            os.kill(os.getpid(), signal.SIGKILL)
        state = self.gather_state(progress, test_metrics)
        if self.strategy.is_main:
            weights = [*state["model"].values(), *(state["training_model"] or {}).values()]
            if not all(torch.isfinite(t).all() for t in weights if t.is_floating_point()):
                raise NonFiniteWeightsError("refusing to write a checkpoint with non-finite weights")
            path = best_checkpoint_path(self.run_dir) if best else step_checkpoint_path(self.run_dir, progress.step)
            save_checkpoint(state, path)
            if not best:
                prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
                self.logger.log_event("checkpoint", step=progress.step, path=str(path))
        self.strategy.barrier()

    def record_test_metrics(self, path: Path, state: dict, test_metrics: dict[str, float]) -> None:
        """Collective: rewrite the checkpoint `state` read from `path` with the test metrics of its weights."""
        if self.strategy.is_main:
            save_checkpoint({**state, "test_metrics": test_metrics}, path)
        self.strategy.barrier()


def _kill_step_from_env(rank: int) -> int | None:
    """The step before whose checkpoint this rank dies (KILL_BEFORE_CHECKPOINT_ENV), on the first attempt only."""
    value = os.environ.get(KILL_BEFORE_CHECKPOINT_ENV)
    if not value or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return None
    kill_rank, step = (int(part) for part in value.split(":"))
    return step if kill_rank == rank else None


def resume_run(cfg: Config, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer,
               lr_schedule: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
               ema: ModelEma | None = None) -> Progress:
    """Restore everything from the newest valid checkpoint, or start fresh; every rank reads the same file."""
    found = latest_valid_checkpoint(Path(cfg.run_dir)) if cfg.checkpoint.resume else None
    if found is None:
        return Progress()
    path, state = found
    progress = Progress(**state["progress"])
    if state["world_size"] != strategy.world_size:
        raise RuntimeError(
            f"{path} was written by a job of world size {state['world_size']}, this one has "
            f"{strategy.world_size}: the reader position and RNG states are per rank. Resume with the same "
            "number of processes, or start a new run_dir from it with model.weights."
        )
    saved_ema = state.get("ema_updates") is not None  # checkpoints older than the EMA have no such key
    model.load_state_dict(state["training_model"] if saved_ema else state["model"])
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"][strategy.rank])
    note = ""
    if ema is not None and saved_ema:
        ema.load(state["model"], state["ema_updates"])
    elif ema is not None:
        ema.restart_from(model)
        note = "; its weights have no EMA, which starts from them now"
    elif saved_ema:
        note = "; its EMA is dropped (train.ema_decay is null): the trained weights go on"
    if strategy.is_main:
        print(f"resumed from {path} at epoch {progress.epoch}, step {progress.step}{note}", flush=True)
    return progress
