"""Training as a library call, `train(cfg, strategy)`: what train/main.py runs, and what the improvement round
runs in-process under its own strategy.

What happens, in order: the shards the run reads are checked against the manifest (train/shard_check.py); the
model is built for the manifest's classes and loads its starting weights (and its EMA starts from them, with
train.ema_decay); the run resumes from the newest valid checkpoint in the run directory; the trainer runs the
epochs (phase changes, checkpoints, validation, early stopping); the test split is evaluated at the end, and the
final checkpoint and best.pt each record the test metrics of their own weights.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import manifest_classes
from train.config import Config, config_to_dict, save_config
from train.ema import ModelEma
from train.freezing import validate_schedule
from train.gpu_stats import GpuStatsSampler
from train.loop import Splits, Trainer
from train.metrics import MetricsLogger
from train.model import build_model
from train.optim import build_lr_schedule, build_optimizer, scaled_lr
from train.precision import depthwise_convs_in_float32
from train.readers import reader_sizes_training_images, steps_per_epoch
from train.roi_align import use_sparse_roi_align
from train.run_checkpoint import resume_run
from train.shard_check import check_shards
from train.shard_reader import Shard, split_shards
from train.strategy import Strategy
from train.wandb_run import finish, resolve_wandb_mode, start_wandb_run
from train.weights import PretrainedWeightsUnavailable, fetch_starting_weights


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fetch_weights_once(cfg: Config, strategy: Strategy) -> None:
    """Download torchvision weights the config names into torch.hub's cache, once per machine: local rank 0
    fetches while the other ranks wait in the gather, then every rank raises PretrainedWeightsUnavailable if
    that failed."""
    error = None
    if strategy.local_rank == 0:
        try:
            fetch_starting_weights(cfg.model)
        except PretrainedWeightsUnavailable as unavailable:
            error = unavailable
    strategy.raise_if_any_failed(error, "fetching the starting weights", PretrainedWeightsUnavailable)


def read_splits(cfg: Config) -> Splits:
    """The shards of the splits this run reads: validation's only when it validates, test's only when it tests at
    the end, so a manifest without them trains when the config does not ask for them. A missing split's error
    says which option reads it."""
    def shards(split: str, option: str) -> list[Shard]:
        try:
            return split_shards(cfg.data.manifest, split)
        except ValueError as error:
            raise ValueError(f"{error}: {option}") from None

    return Splits(
        train=shards(cfg.data.train_split, "data.train_split names the split to train on"),
        val=shards(cfg.data.val_split, "validation reads it (data.val_split); eval.every_epochs=0 trains "
                   "without it") if cfg.eval.every_epochs else [],
        test=shards(cfg.data.test_split, "the test at the end reads it (data.test_split); eval.test_at_end=false "
                    "trains without it") if cfg.eval.test_at_end else [],
    )


def speed_up_cpu_training(model: torch.nn.Module, amp: str) -> int:
    """What only CPU training does for speed (docs/benchmarks.md): RoIAlign as a sparse product and, under bf16,
    depthwise convolutions in float32. Returns how many depthwise convolutions were made float32."""
    use_sparse_roi_align()
    return depthwise_convs_in_float32(model) if amp == "bf16" else 0


def train(cfg: Config, strategy: Strategy) -> None:
    run_dir = Path(cfg.run_dir)
    classes = manifest_classes(cfg.data.manifest)
    splits = read_splits(cfg)
    check_shards(cfg.data.manifest, splits.train + splits.val + splits.test, strategy,
                 checksums=cfg.data.verify_checksums)

    seed_everything(cfg.seed)  # the same initial weights on every rank
    model, weights_report = build_model(cfg.model, classes.num_classes, max_detections=cfg.eval.max_detections,
                                        resize_in_training=not reader_sizes_training_images(cfg.data))
    validate_schedule(model, cfg.freeze.phases)
    float32_depthwise = speed_up_cpu_training(model, cfg.train.amp) if strategy.device.type == "cpu" else 0
    model.to(strategy.device, memory_format=torch.channels_last if cfg.train.channels_last else torch.preserve_format)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if cfg.train.compile_backbone:
        model.backbone.compile()  # in place: checkpoints keep their keys
    seed_everything(cfg.seed + strategy.rank)  # different RPN/ROI sampling draws per rank
    ema = ModelEma(model, cfg.train.ema_decay, cfg.train.ema_tau) if cfg.train.ema_decay is not None else None

    loader_batch = strategy.loader_batch_size(cfg.data.batch_size)
    global_batch = loader_batch * strategy.world_size * cfg.optim.accumulate_steps
    epoch_steps = steps_per_epoch(splits.train, world_size=strategy.world_size, loader_batch_size=loader_batch,
                                  accumulate_steps=cfg.optim.accumulate_steps)
    optimizer = build_optimizer(cfg.optim, model, scaled_lr(cfg.optim, global_batch))
    lr_schedule = build_lr_schedule(cfg.optim, optimizer, epoch_steps, epoch_steps * cfg.train.epochs)
    scaler = torch.amp.GradScaler(strategy.device.type) if cfg.train.amp == "fp16" else None
    progress = resume_run(cfg, strategy, model, optimizer, lr_schedule, scaler, ema)

    wandb_run = None
    gpu_stats = GpuStatsSampler()
    if strategy.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        gpu_stats.start()
        wandb_run = start_wandb_run(
            run_dir, config_to_dict(cfg), resolve_wandb_mode(cfg.wandb.mode), cfg.wandb.project, cfg.wandb.group,
            cfg.wandb.name, {"strategy": strategy.kind, "world_size": strategy.world_size,
                             "global_batch": global_batch, "gpu_names": gpu_stats.gpu_names()},
        )
        print(f"{strategy}; global batch {global_batch}; {epoch_steps} steps/epoch\n{weights_report}", flush=True)
        if float32_depthwise:
            print(f"bf16 autocast on the CPU: {float32_depthwise} depthwise convolutions compute in float32, "
                  "faster there than oneDNN's bf16 ones", flush=True)
    logger = MetricsLogger(run_dir, enabled=strategy.is_main, wandb_run=wandb_run, gpu_stats=gpu_stats)

    trainer = Trainer(cfg, strategy, model, optimizer, lr_schedule, scaler, splits, classes, logger, progress, ema)
    try:
        trainer.fit()
        if cfg.eval.test_at_end:
            trainer.test_final_and_best()  # the final checkpoint and best.pt each record their weights' test AP
    finally:
        gpu_stats.stop()
        logger.close()
        if wandb_run is not None:
            finish(wandb_run)
    if strategy.is_main:
        print(f"run directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}\n  checkpoints: "
              f"{run_dir}/checkpoint-*.pt, best: {run_dir / 'best.pt'}\n  wandb: "
              f"{getattr(wandb_run, 'dir', 'disabled')}", flush=True)
