"""train/readers.py: the loaders that training, evaluation and the improvement round build from the config, and
the steps a training epoch takes."""

import pytest
import torch

from data_prep.class_list import ClassList
from data_prep.manifest import load_manifest, manifest_classes
from train.config import DataConfig
from train.readers import split_loader, steps_per_epoch
from train.shard_reader import split_shards
from train.strategy import Strategy

CPU = torch.device("cpu")
DATA = DataConfig(batch_size=2, num_workers=0, shuffle_buffer=8)


def rank_strategy(rank: int, world_size: int) -> Strategy:
    """A rank's view of a DDP job; the loaders use its rank and world size, no collective."""
    return Strategy(kind="ddp", device=CPU, rank=rank, world_size=world_size)


def image_ids(loader) -> list[int]:
    return [target["image_id"] for _, targets in loader for target in targets]


def test_evaluation_covers_the_split_once_in_batches_of_the_strategy(small_manifest):
    shards = split_shards(small_manifest, "val")
    classes = manifest_classes(small_manifest)
    ids = []
    for rank in range(2):
        loader = split_loader(shards, DATA, rank_strategy(rank, 2), training=False, classes=classes)
        ids += image_ids(loader)
    assert sorted(ids) == sorted(load_manifest(small_manifest)["splits"]["val"]["image_ids"])

    dp = Strategy(kind="dp", device=CPU, num_replicas=2)  # one loader feeds batch_size images to each replica
    sizes = [len(images) for images, _ in split_loader(shards, DATA, dp, training=False, classes=classes)]
    assert sizes[:-1] == [4] * (len(sizes) - 1) and 0 < sizes[-1] <= 4


def test_labels_follow_the_given_class_list(small_manifest):
    classes = manifest_classes(small_manifest)
    reversed_classes = ClassList.from_json(
        [{**entry, "label": len(classes) + 1 - entry["label"]} for entry in classes.to_json()], "reversed")
    shards = split_shards(small_manifest, "val")
    strategy = Strategy(kind="single", device=CPU)

    def labels_read(class_list):
        loader = split_loader(shards, DATA, strategy, training=False, classes=class_list)
        return [label for _, targets in loader for target in targets for label in target["labels"].tolist()]

    stored = labels_read(classes)
    assert stored and labels_read(reversed_classes) == [len(classes) + 1 - label for label in stored]


def test_training_resumes_at_a_position_of_the_planned_epoch(small_manifest):
    shards = split_shards(small_manifest, "train")
    classes = manifest_classes(small_manifest)
    strategy = rank_strategy(1, 2)

    def read(start_sample, epoch=1):
        return image_ids(split_loader(shards, DATA, strategy, training=True, classes=classes, seed=3, epoch=epoch,
                                      start_sample=start_sample))

    whole = read(0)
    assert len(whole) == sum(shard.num_samples for shard in shards) // 2
    assert read(4) == whole[4:] and read(0, epoch=2) != whole


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize(("batch_size", "accumulate_steps"), [(2, 1), (2, 3), (3, 2), (5, 4)])
def test_steps_per_epoch_counts_the_optimizer_steps_of_every_rank(small_manifest, world_size, batch_size,
                                                                 accumulate_steps):
    shards = split_shards(small_manifest, "train")
    data = DataConfig(batch_size=batch_size, num_workers=0)
    classes = manifest_classes(small_manifest)
    for rank in range(world_size):
        loader = split_loader(shards, data, rank_strategy(rank, world_size), training=True, classes=classes)
        # the loop steps after every accumulate_steps batches and after the epoch's last one
        steps = sum(index % accumulate_steps == accumulate_steps - 1 or index == len(loader) - 1
                    for index in range(len(loader)))
        assert steps_per_epoch(shards, world_size=world_size, loader_batch_size=batch_size,
                               accumulate_steps=accumulate_steps) == steps
