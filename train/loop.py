"""The training loop: optimizer steps over exact epochs, with phase changes, checkpoints and evaluation between them.

The step itself is `_forward_backward` + `_optimizer_step` (and the weights' EMA, train.ema_decay); everything
else happens at step or epoch boundaries, where every rank is at the same place, so collectives (DDP re-wrapping,
RNG gathering, evaluation, the early stopping decision from the broadcast validation metrics) are safe there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data_prep.class_list import ClassList
from train.checkpoint import best_checkpoint_path, load_checkpoint
from train.config import Config
from train.ema import ModelEma
from train.eval_plots import EvalPlots
from train.evaluate import evaluate, predict
from train.freezing import apply_phase, phase_at
from train.metrics import IntervalMeter, MetricsLogger
from train.precision import AMP_DTYPES
from train.readers import split_loader
from train.run_checkpoint import Progress, RunCheckpointer
from train.shard_reader import Shard, first_images
from train.strategy import Strategy
from train.wandb_run import log_detection_images


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row: the run stops rather than train garbage."""


@dataclass
class Splits:
    train: list[Shard]
    val: list[Shard]
    test: list[Shard]


class Trainer:
    """Trains one run from `progress` on: every rank builds one and calls `fit` (then `test_final_and_best`)
    together, since phase changes, checkpoints and evaluations are collectives. With `ema` (train.ema_decay)
    the average is what is evaluated and saved as the model; the trained weights go on training."""

    def __init__(
        self,
        cfg: Config,
        strategy: Strategy,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_schedule: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        splits: Splits,
        classes: ClassList,
        logger: MetricsLogger,
        progress: Progress,
        ema: ModelEma | None = None,
    ):
        self.cfg, self.strategy, self.model_without_ddp, self.ema = cfg, strategy, model, ema
        self.optimizer, self.lr_schedule, self.scaler = optimizer, lr_schedule, scaler
        self.splits, self.classes, self.logger, self.progress = splits, classes, logger, progress
        self.run_dir = Path(cfg.run_dir)
        self.device = strategy.device
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        self.checkpointer = RunCheckpointer(cfg, strategy, model, optimizer, lr_schedule, scaler, classes, logger,
                                            ema)
        self.model = self._apply_phase(initial=True)

    # ---- freezing phases -------------------------------------------------------------------------------------
    def _apply_phase(self, initial: bool = False) -> nn.Module:
        """Set requires_grad for the current phase and (re)build the DDP wrapper on all ranks together.

        DDP registers only the parameters that require grad when it is built: a parameter unfrozen under a live
        wrapper would never be all-reduced and the replicas would drift apart silently.
        """
        phases = self.cfg.freeze.phases
        index = phase_at(phases, self.progress.epoch, self.progress.step)
        if not initial and index == self.progress.phase:
            return self.model
        self.progress.phase = index
        trainable = apply_phase(self.model_without_ddp, phases[index]) if index is not None else sum(
            p.numel() for p in self.model_without_ddp.parameters() if p.requires_grad
        )
        name = phases[index].name if index is not None else "all"
        self.logger.log_event("phase", step=self.progress.step, epoch=self.progress.epoch, phase=name,
                              trainable_parameters=trainable)
        return self.strategy.wrap(self.model_without_ddp)

    # ---- one step --------------------------------------------------------------------------------------------
    def _to_device(self, images, targets):
        images = [image.to(self.device, non_blocking=True).float().div_(255) for image in images]
        targets = [
            {"boxes": t["boxes"].to(self.device, non_blocking=True), "labels": t["labels"].to(self.device)}
            for t in targets
        ]
        return images, targets

    def _forward_backward(self, images, targets, sync_gradients: bool) -> dict[str, torch.Tensor]:
        no_sync = getattr(self.model, "no_sync", None)
        with (nullcontext() if sync_gradients or no_sync is None else no_sync()):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                losses = self.model(images, targets)
            loss = sum(losses.values()) / self.cfg.optim.accumulate_steps
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        return {name: value.detach() for name, value in losses.items()}

    def _optimizer_step(self) -> bool:
        """Clip, step and update the EMA; returns False (and skips the update) when the gradients are not finite.

        Gradients are already all-reduced here, so every rank sees the same norm and takes the same decision.
        This is the loop's one host sync per step; Faster R-CNN syncs many times per step anyway (NMS, sampling).
        """
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.clip_grad_norm or math.inf
        grad_norm = nn.utils.clip_grad_norm_(
            [p for p in self.model_without_ddp.parameters() if p.grad is not None], max_norm
        )
        finite = bool(torch.isfinite(grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.lr_schedule.step()
            if self.ema is not None:
                self.ema.update(self.model_without_ddp)  # every rank: the same all-reduced weights, no collective
        return finite

    def _after_nonfinite_step(self, finite: bool) -> None:
        progress = self.progress
        if finite:
            progress.nonfinite_in_a_row = 0
            return
        progress.nonfinite_in_a_row += 1
        self.logger.log_event("nonfinite_step_skipped", step=progress.step, in_a_row=progress.nonfinite_in_a_row)
        if progress.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{progress.nonfinite_in_a_row} non-finite losses in a row at step {progress.step}: stopping "
                f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); the last checkpoint in "
                f"{self.run_dir} holds finite weights. Lower optim.lr, set optim.clip_grad_norm or use amp bf16."
            )

    # ---- the epochs ------------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, progress = self.cfg, self.progress
        if self._out_of_patience():  # a resumed run that early stopping had ended: its end is kept
            if self.strategy.is_main:
                print(f"early stopping ended this run at epoch {progress.epoch} ({progress.evals_since_improvement} "
                      f"validations without improvement, train.patience={cfg.train.patience}): nothing to train",
                      flush=True)
            return
        meter = IntervalMeter(warmup_steps=cfg.train.throughput_warmup_steps, device=self.device)
        while progress.epoch < cfg.train.epochs:
            if self._reached_max_steps() or not self._train_epoch(meter):
                self.checkpointer.save(progress)  # train.max_steps stopped the run inside an epoch
                return
            self._finish_epoch()
            if self._out_of_patience():
                self._log_early_stop()
                return
            if self._reached_max_steps():
                return

    def _finish_epoch(self) -> None:
        """Next epoch's position and phase, validation (best.pt, early stopping), and the epoch-end checkpoint."""
        cfg, progress = self.cfg, self.progress
        progress.epoch += 1
        progress.samples_in_epoch = 0
        self.model = self._apply_phase()
        if cfg.eval.every_epochs and progress.epoch % cfg.eval.every_epochs == 0:
            metrics = self.evaluate(cfg.data.val_split, self.splits.val)
            self._count_patience(metrics["AP"])
            if metrics["AP"] > progress.best_ap:
                progress.best_ap = metrics["AP"]
                self.checkpointer.save(progress, best=True)
        self.checkpointer.save(progress)

    def _count_patience(self, ap: float) -> None:
        """Early stopping's count. A validation improves when its AP beats the AP of the last improvement by
        more than train.min_delta (the rule of Keras' and Lightning's EarlyStopping: smaller gains neither reset
        the count nor move the mark, so a slow creep still counts once it adds up). A NaN AP (no ground truth)
        never improves. The metrics were broadcast, so every rank counts the same and stops at the same epoch."""
        progress = self.progress
        if ap > progress.ap_at_last_improvement + self.cfg.train.min_delta:
            progress.ap_at_last_improvement, progress.evals_since_improvement = ap, 0
            return
        progress.evals_since_improvement += 1

    def _out_of_patience(self) -> bool:
        patience = self.cfg.train.patience
        return bool(patience) and self.progress.evals_since_improvement >= patience

    def _log_early_stop(self) -> None:
        progress, train_cfg = self.progress, self.cfg.train
        self.logger.log_event(
            "early_stop", to_wandb=True, step=progress.step, epoch=progress.epoch, best_ap=progress.best_ap,
            evals_since_improvement=progress.evals_since_improvement, patience=train_cfg.patience,
            min_delta=train_cfg.min_delta,
        )

    def _reached_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.progress.step >= self.cfg.train.max_steps

    def _train_epoch(self, meter: IntervalMeter) -> bool:
        """Train from the current position; True when the epoch's last sample was consumed."""
        cfg, progress = self.cfg, self.progress
        loader = split_loader(
            self.splits.train, cfg.data, self.strategy, training=True, classes=self.classes, seed=cfg.seed,
            epoch=progress.epoch, start_sample=progress.samples_in_epoch,
        )
        self.model.train()
        micro_batches, accumulated, window_images = len(loader), 0, 0
        data_start = time.perf_counter()
        for index, (images, targets) in enumerate(loader):
            meter.data_done(time.perf_counter() - data_start)
            images, targets = self._to_device(images, targets)
            accumulated += 1
            last_of_window = accumulated == cfg.optim.accumulate_steps or index == micro_batches - 1
            losses = self._forward_backward(images, targets, sync_gradients=last_of_window)
            progress.samples_in_epoch += len(images)
            window_images += len(images)
            meter.step_done(losses, images=len(images))
            if not last_of_window:
                data_start = time.perf_counter()
                continue
            finite = self._optimizer_step()
            progress.step += 1
            # every rank's batches have the same sizes (the reader's plan), so this counts the whole job exactly
            progress.images_seen += window_images * self.strategy.world_size
            accumulated, window_images = 0, 0
            self._after_nonfinite_step(finite)
            if progress.step % cfg.train.log_every == 0:
                self._log_interval(meter)
            if cfg.checkpoint.every_steps and progress.step % cfg.checkpoint.every_steps == 0:
                self.checkpointer.save(progress)
            self.model = self._apply_phase()
            if self._reached_max_steps():
                break
            data_start = time.perf_counter()
        return progress.samples_in_epoch == loader.dataset.num_samples

    def _log_interval(self, meter: IntervalMeter) -> None:
        values = meter.summary()
        per_rank = self.strategy.all_gather_object(values.get("images_per_s"))
        if all(rate is not None for rate in per_rank):
            values.update({f"images_per_s/rank{rank}": rate for rank, rate in enumerate(per_rank)})
            values["images_per_s"] = sum(per_rank)
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        phase = self.progress.phase
        values["phase"] = self.cfg.freeze.phases[phase].name if phase is not None else "all"
        self.logger.log_train(self.progress.step, self.progress.epoch, self.progress.images_seen, values)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, split: str, shards: list[Shard], at: Progress | None = None,
                 detections_suffix: str = "", weights: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """COCO metrics on `split` of `weights` (default: the deployable weights now, the EMA's with
        train.ema_decay, else the model's), logged at `at` (default: now); rank 0 writes the detections to
        detections_<split><detections_suffix>.json, and for the test split the figures (train/eval_plots.py)."""
        at = at or self.progress
        eval_cfg = self.cfg.eval
        if weights is None and self.ema is not None:
            self.ema.share_rank0_buffers(self.strategy)  # every rank evaluates the same average
            weights = self.ema.weights
        elif weights is None:
            # DDP hands rank 0's BatchNorm statistics to the others at the start of a forward, and each rank's
            # last forward then moved its own: without this, each rank would evaluate slightly different weights
            self.strategy.broadcast_tensors(list(self.model_without_ddp.buffers()))
        loader = split_loader(shards, self.cfg.data, self.strategy, training=False, classes=self.classes)
        plots = (EvalPlots(self.run_dir, f"{split}{detections_suffix}", eval_cfg.confusion_score)
                 if split == self.cfg.data.test_split else None)
        with self._weights_loaded(weights):
            metrics = evaluate(
                self.model_without_ddp, loader, self.classes, self.strategy, self.device,
                out_path=self.run_dir / f"detections_{split}{detections_suffix}.json", amp_dtype=self.amp_dtype,
                score_threshold=eval_cfg.score_threshold, max_detections=eval_cfg.max_detections, plots=plots,
            )
            images_seen = None if at is self.progress else at.images_seen  # None: as of the last training record
            self.logger.log_eval(at.step, at.epoch, split, metrics, images_seen=images_seen,
                                 plots=plots.paths() if plots else None)
            if split == self.cfg.data.val_split:
                self._log_validation_images(shards)
        return metrics

    def test_final_and_best(self) -> None:
        """Evaluate the test split and record the metrics in the checkpoint of the weights they measure.

        The final checkpoint (written again now, at the last step) gets the test metrics of its deployable
        weights (the EMA's with train.ema_decay). best.pt, when validation in this run wrote one, gets the test
        metrics of best.pt's weights: when no optimizer step came after it (the last validation was the best)
        those are the final weights and the metrics are reused; otherwise its weights are evaluated too, logged as
        a test evaluation at best.pt's step, with detections in detections_<split>_best.json. Extraction reads
        either file's test_metrics["AP"] as the model's test AP.
        """
        split, shards = self.cfg.data.test_split, self.splits.test
        final_metrics = self.evaluate(split, shards)
        self.checkpointer.save(self.progress, test_metrics=final_metrics)
        if self.progress.best_ap < 0:  # no validation ran: this run wrote no best.pt
            return
        best_path = best_checkpoint_path(self.run_dir)
        best = load_checkpoint(best_path)  # every rank: all evaluate its weights, or none does
        best_progress = Progress(**best["progress"])
        if best_progress.step == self.progress.step:
            best_metrics = final_metrics
        else:
            best_metrics = self.evaluate(split, shards, at=best_progress, detections_suffix="_best",
                                         weights=best["model"])
        self.checkpointer.record_test_metrics(best_path, best, best_metrics)

    @contextmanager
    def _weights_loaded(self, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """The model holds `weights` (an EMA, an earlier checkpoint's) inside the block and its own, bitwise,
        after it; None leaves it as it is."""
        if weights is None:
            yield
            return
        own_weights = {name: tensor.clone() for name, tensor in self.model_without_ddp.state_dict().items()}
        self.model_without_ddp.load_state_dict(weights)
        try:
            yield
        finally:
            self.model_without_ddp.load_state_dict(own_weights)

    def _log_validation_images(self, shards: list[Shard]) -> None:
        """The first few validation images with their predicted boxes, to wandb (rank 0, which owns the run)."""
        count = self.cfg.wandb.log_images
        if self.logger.wandb_run is None or count == 0:
            return
        images = first_images(shards, count)
        self.model_without_ddp.eval()
        predictions = predict(self.model_without_ddp, images, self.device, self.amp_dtype)
        self.model_without_ddp.train()
        log_detection_images(self.logger.wandb_run, images, predictions,
                             {category.label: category.name for category in self.classes}, step=self.progress.step)
