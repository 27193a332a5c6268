"""Exact-epoch WebDataset reader: a split of a data_prep manifest -> batches for torchvision detectors.

webdataset 1.0 splits shards over ranks and workers *before* it shuffles them, repeats the same shard order
every epoch when `shardshuffle` has no seed, and offers only sampling with replacement for DDP. None of that
gives exact epochs or resume, so this module plans each epoch itself and uses webdataset only to read tars:

1. The epoch plan is a pure function of (seed, epoch, world size): the split's shards are permuted from
   (seed, epoch), identically on every rank, and concatenated into one global sample stream.
2. Rank r takes the contiguous range [r*q, (r+1)*q) of that stream, q = N // world_size, so every rank gets
   exactly q samples (DDP hangs otherwise) and no sample is read twice. The N % world_size samples at the end
   of the stream are left out of that epoch; since the permutation changes every epoch, a different few are
   left out each time. Evaluation instead splits the manifest order into near-equal ranges that cover it all.
3. Within a rank the samples go through a shuffle buffer seeded from (seed, epoch, rank), then into batches;
   when training, landscape and portrait images are batched separately (as torchvision's GroupedBatchSampler
   does) so that a batch pads less. The rank's batches therefore do not depend on the DataLoader worker count.
4. DataLoader workers take batches round-robin (worker w decodes batches w, w+W, ...), which is the order in
   which the DataLoader collects them. Every worker reads the rank's raw tar stream (cheap) but decodes only
   its own batches (the expensive part).
5. Resuming at sample k of an epoch (a multiple of the batch size) skips k raw samples of the rank's batches
   before any decoding and yields exactly what an uninterrupted reader would have yielded from there.

Augmentation (the horizontal flip, and the scale policies of train/augment.py) is drawn per sample from
(seed, epoch, key), so it is the same whichever worker or resume point reads the sample; evaluation is never
augmented. Training labels come from the original category ids through the class list the trainer uses
(`classes`, a data_prep.class_list.ClassList), so shards of several data_prep outputs, each numbered for its own
classes, can be read as one set.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from data_prep.class_list import ClassList
from data_prep.manifest import load_manifest, split_entry
from train.augment import ScaleAugmentation


class ShardReadError(RuntimeError):
    """A sample that could not be read or decoded; the message names the shard and the key."""


@dataclass(frozen=True)
class Shard:
    path: Path
    num_samples: int


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard."""

    shard: Shard
    start: int
    stop: int


def split_shards(manifest_path: str | Path, split: str) -> list[Shard]:
    manifest_path = Path(manifest_path)
    entry = split_entry(load_manifest(manifest_path), manifest_path, split)
    return [Shard(manifest_path.parent / shard["file"], int(shard["num_samples"])) for shard in entry["shards"]]


def rank_segments(
    shards: list[Shard], *, seed: int, epoch: int, rank: int, world_size: int, training: bool
) -> list[Segment]:
    """The rank's part of the epoch as shard segments (see the module docstring for the plan)."""
    total = sum(shard.num_samples for shard in shards)
    if training:
        order = random.Random(f"shards/{seed}/{epoch}").sample(shards, k=len(shards))
        per_rank = total // world_size
        begin, end = rank * per_rank, (rank + 1) * per_rank
    else:
        order = shards
        begin, end = total * rank // world_size, total * (rank + 1) // world_size
    segments, offset = [], 0
    for shard in order:
        start, stop = max(begin - offset, 0), min(end - offset, shard.num_samples)
        if start < stop:
            segments.append(Segment(shard, start, stop))
        offset += shard.num_samples
    return segments


def samples_per_rank(shards: list[Shard], *, rank: int, world_size: int, training: bool) -> int:
    total = sum(shard.num_samples for shard in shards)
    if training:
        return total // world_size
    return total * (rank + 1) // world_size - total * rank // world_size


def iter_raw_samples(path: Path) -> Iterator[dict]:
    """Undecoded samples ({"__key__", "jpg", "json", ...}) of one shard, in stored order.

    Python's streaming tar reader takes a damaged member header for the end of the archive, without an error:
    a sample cut short by it raises ShardReadError here, and a shard that ends early raises in segment_samples.
    """
    key = None
    try:
        with open(path, "rb") as stream:
            files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
            for sample in wds.tariterators.group_by_keys(files):
                key = sample["__key__"]
                if "jpg" not in sample or "json" not in sample:
                    members = sorted(name for name in sample if not name.startswith("__"))
                    raise ShardReadError(f"{path}: sample {key}: has members {members}, not jpg and json: the tar "
                                         "is damaged there")
                yield sample
    except (tarfile.TarError, OSError) as error:  # webdataset appends its stream to the message: drop it
        where = f"after sample {key}" if key else "at its first sample"
        raise ShardReadError(f"{path}: unreadable {where}: {str(error.args[0]).split(' @ ')[0]}") from error


def segment_samples(segments: list[Segment]) -> Iterator[dict]:
    """The raw samples of the segments, in order; a shard with fewer samples than the manifest lists raises."""
    for segment in segments:
        read, key = 0, None
        for sample in iter_raw_samples(segment.shard.path):
            if read >= segment.stop:
                break
            if read >= segment.start:
                yield sample
            read, key = read + 1, sample["__key__"]
        if read < segment.stop:
            after = f"sample {key}" if key else "no sample"
            raise ShardReadError(f"{segment.shard.path}: ends after {after} ({read} samples; the manifest lists "
                                 f"{segment.shard.num_samples}): truncated, or a tar header is damaged")


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style shuffle buffer: deterministic for a given rng and input order."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _chunks(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _aspect_ratio_batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Batches of landscape-only or portrait-only images; the few left over at the end are batched together."""
    pending: dict[bool, list[dict]] = {True: [], False: []}
    for sample in samples:
        try:
            meta = json.loads(sample["json"])
            group = pending[meta["width"] >= meta["height"]]
        except Exception as error:
            raise ShardReadError(f"{sample.get('__url__')}: sample {sample['__key__']}: {error!r}") from error
        group.append(sample)
        if len(group) == size:
            yield group.copy()
            group.clear()
    yield from _chunks(iter(pending[True] + pending[False]), size)


def decode_sample(
    sample: dict, *, training: bool, hflip: bool, classes: ClassList | None = None
) -> tuple[torch.Tensor, dict]:
    """(uint8 image [3, H, W], target dict) from a raw shard sample; crowd boxes only for evaluation.

    Labels come from each annotation's category id through `classes`; without it, the labels stored in the
    shard are used.
    """
    meta = json.loads(sample["json"])
    image = decode_jpeg(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    annotations = [a for a in meta["annotations"] if not (training and a["iscrowd"])]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    if hflip:
        image = image.flip(-1)
        boxes = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1], image.shape[-1] - boxes[:, 0], boxes[:, 3]], 1)
    target = {
        "boxes": boxes,
        "labels": torch.tensor(
            [classes.label_of(a["category_id"]) if classes else a["label"] for a in annotations], dtype=torch.int64
        ),
        "image_id": int(meta["image_id"]),
        "iscrowd": torch.tensor([a["iscrowd"] for a in annotations], dtype=torch.int64),
        "area": torch.tensor([a["area"] for a in annotations], dtype=torch.float32),
    }
    return image, target


class ShardBatches(IterableDataset):
    """One rank's batches of one epoch of a split; see the module docstring for the guarantees."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        training: bool = True,
        start_sample: int = 0,
        shuffle_buffer: int = 64,
        hflip_prob: float = 0.5,
        aspect_ratio_grouping: bool = True,
        scale_augmentation: ScaleAugmentation | None = None,
        classes: ClassList | None = None,
    ):
        super().__init__()
        self.shards, self.batch_size, self.seed, self.epoch = shards, batch_size, seed, epoch
        self.rank, self.world_size, self.training = rank, world_size, training
        self.start_sample, self.shuffle_buffer, self.hflip_prob = start_sample, shuffle_buffer, hflip_prob
        self.aspect_ratio_grouping = aspect_ratio_grouping and training
        self.scale_augmentation = scale_augmentation if training else None
        self.classes = classes
        self.num_samples = samples_per_rank(shards, rank=rank, world_size=world_size, training=training)
        if not 0 <= start_sample <= self.num_samples:
            raise ValueError(f"start_sample {start_sample} outside this rank's {self.num_samples} samples")
        if start_sample % batch_size and start_sample != self.num_samples:
            raise ValueError(f"start_sample {start_sample} is not a multiple of the batch size {batch_size}")

    def __len__(self) -> int:
        """Batches left to yield on this rank (the same on every rank when training)."""
        return -(-(self.num_samples - self.start_sample) // self.batch_size)

    def rank_batches(self) -> Iterator[list[dict]]:
        """This rank's raw (undecoded) batches of the epoch in final order, before the resume skip."""
        segments = rank_segments(
            self.shards, seed=self.seed, epoch=self.epoch, rank=self.rank,
            world_size=self.world_size, training=self.training,
        )
        samples = segment_samples(segments)
        if self.training and self.shuffle_buffer > 1:
            rng = random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}")
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        if self.aspect_ratio_grouping:
            return _aspect_ratio_batches(samples, self.batch_size)
        return _chunks(samples, self.batch_size)

    def _flip(self, key: str) -> bool:
        return self.training and random.Random(f"flip/{self.seed}/{self.epoch}/{key}").random() < self.hflip_prob

    def _decode_batch(self, raw_batch: list[dict]) -> tuple[list[torch.Tensor], list[dict]]:
        images, targets = [], []
        for sample in raw_batch:
            key = sample["__key__"]
            try:
                image, target = decode_sample(sample, training=self.training, hflip=self._flip(key),
                                              classes=self.classes)
                if self.scale_augmentation is not None:
                    rng = random.Random(f"scale/{self.seed}/{self.epoch}/{key}")
                    image, target = self.scale_augmentation(image, target, rng)
            except Exception as error:
                raise ShardReadError(f"{sample.get('__url__')}: sample {key}: {error}") from error
            images.append(image)
            targets.append(target)
        if get_worker_info() is not None:  # see ShardLoader
            targets = [{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        return images, targets

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        skip = self.start_sample // self.batch_size
        for index, raw_batch in enumerate(self.rank_batches()):
            if index >= skip and (index - skip) % num_workers == worker_id:
                yield self._decode_batch(raw_batch)


class ShardLoader:
    """DataLoader over ShardBatches whose workers ship the targets as numpy arrays.

    Every tensor that crosses a worker's queue gets a shared-memory segment of its own; for the few dozen tiny
    target tensors of a batch that cost more than decoding its images (313 against 600 samples/s per worker,
    measured with bench/data_loading.py). Numpy arrays are pickled inline and turned back into tensors here,
    without a copy. Workers are not persistent because each epoch has its own plan.

    The loader has its own generator, so creating it draws nothing from torch's global RNG, which exact
    resume restores: an uninterrupted run and a resumed one would otherwise diverge at the next loader.
    """

    def __init__(self, dataset: ShardBatches, *, num_workers: int, pin_memory: bool):
        self.dataset = dataset
        self.loader = DataLoader(
            dataset,
            generator=torch.Generator(),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=2 if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        for images, targets in self.loader:
            yield images, [{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in t.items()}
                           for t in targets]


def _as_is(batch):
    return batch


def first_images(shards: list[Shard], count: int) -> list[torch.Tensor]:
    """The first `count` images of a split in manifest order, decoded in this process: a preview."""
    images, _ = next(iter(ShardBatches(shards, batch_size=count, seed=0, epoch=0, training=False)))
    return images


def summarize(manifest_path: str | Path, batch_size: int = 8, num_workers: int = 2) -> None:
    """Read every split back through the reader (evaluation mode) and print what came out."""
    manifest = load_manifest(manifest_path)
    print(f"{'split':<8}{'shards':>8}{'samples':>9}{'read':>7}{'boxes':>8}{'crowd':>7}")
    for split in manifest["splits"]:
        dataset = ShardBatches(split_shards(manifest_path, split), batch_size=batch_size, seed=0, epoch=0,
                               training=False)
        read = boxes = crowd = 0
        for _, targets in ShardLoader(dataset, num_workers=num_workers, pin_memory=False):
            read += len(targets)
            boxes += sum(len(t["boxes"]) for t in targets)
            crowd += sum(int(t["iscrowd"].sum()) for t in targets)
        print(f"{split:<8}{len(dataset.shards):>8}{manifest['splits'][split]['num_samples']:>9}{read:>7}"
              f"{boxes:>8}{crowd:>7}")


if __name__ == "__main__":
    import sys

    summarize(sys.argv[1])
