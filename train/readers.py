"""The one place a shard loader is built from the config: training epochs, evaluation (during training and in
the improvement round) and the number of optimizer steps a training epoch takes.

The loader batch is the strategy's: under dp one loader feeds batch_size images to each replica. Evaluation
reads the same batches and runs the unwrapped model on them on one device (train/evaluate.py).
"""

from __future__ import annotations

from data_prep.class_list import ClassList
from train.augment import LargeScaleJitter, Multiscale, ScaleAugmentation
from train.config import DataConfig
from train.shard_reader import Shard, ShardBatches, ShardLoader, samples_per_rank
from train.strategy import Strategy


def split_loader(
    shards: list[Shard],
    data: DataConfig,
    strategy: Strategy,
    *,
    training: bool,
    classes: ClassList,
    seed: int = 0,
    epoch: int = 0,
    start_sample: int = 0,
) -> ShardLoader:
    """This rank's batches of a split, labelled by category id through `classes`, the model's class list.

    Training reads the epoch that (seed, epoch) plan from `start_sample` on (a resume position), shuffled and
    augmented as `data` says. Evaluation (training=False) reads the split in manifest order, each sample once
    over all ranks, and ignores seed, epoch and start_sample.
    """
    dataset = ShardBatches(
        shards, batch_size=strategy.loader_batch_size(data.batch_size), seed=seed, epoch=epoch,
        rank=strategy.rank, world_size=strategy.world_size, training=training, start_sample=start_sample,
        shuffle_buffer=data.shuffle_buffer, hflip_prob=data.hflip_prob,
        aspect_ratio_grouping=data.aspect_ratio_grouping, scale_augmentation=scale_augmentation(data),
        classes=classes,
    )
    return ShardLoader(dataset, num_workers=data.num_workers, pin_memory=strategy.device.type == "cuda")


def scale_augmentation(data: DataConfig) -> ScaleAugmentation | None:
    """The reader's scale policy for `data.augment`; None for hflip, where the model sizes the images."""
    if data.augment == "multiscale":
        return Multiscale(tuple(data.scales), data.max_size)
    if data.augment == "lsj":
        return LargeScaleJitter((data.jitter_range[0], data.jitter_range[1]), data.crop_size)
    return None


def reader_sizes_training_images(data: DataConfig) -> bool:
    """True when the reader gives training images their size, so the model must not resize them again."""
    return scale_augmentation(data) is not None


def steps_per_epoch(shards: list[Shard], *, world_size: int, loader_batch_size: int, accumulate_steps: int) -> int:
    """Optimizer steps in one training epoch of `shards`: each rank's batches, accumulate_steps at a time; the
    last, shorter window of an epoch steps too (the loop steps at the epoch's last batch)."""
    batches = -(-samples_per_rank(shards, rank=0, world_size=world_size, training=True) // loader_batch_size)
    return -(-batches // accumulate_steps)
