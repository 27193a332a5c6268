"""What extraction reads: image files (normalised exactly as data_prep normalised the training images) or a
manifest split's shard samples, split into contiguous parts per rank and loaded in batches by the workers."""

from __future__ import annotations

import functools
import glob
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from data_prep.images import ImageRejected, normalize_image
from extract.database import SkippedImage
from train.shard_reader import Shard, rank_segments, segment_samples

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})


@dataclass
class Loaded:
    """One input read by a loader worker: the image, or why it was skipped."""

    index: int  # position in the whole input, across ranks
    source: str  # file path or shard key
    image: torch.Tensor | None = None  # uint8 [3, H, W]
    sha256: str = ""
    skipped: SkippedImage | None = None


def list_input_files(spec: str) -> list[Path]:
    """A folder (recursively, files with an image suffix), a glob pattern, or one file; sorted, absolute."""
    path = Path(spec)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():
        files = [path]
    elif glob.has_magic(spec):
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    else:
        raise FileNotFoundError(f"--input {spec}: no such file or folder, and not a glob pattern")
    if not files:
        raise FileNotFoundError(f"--input {spec}: no image files found")
    return sorted(p.resolve() for p in files)


def load_file(path: Path) -> tuple[str, torch.Tensor]:
    normalized = normalize_image(path, None, None)
    jpeg = torch.frombuffer(bytearray(normalized.jpeg), dtype=torch.uint8)
    return normalized.sha256, decode_jpeg(jpeg, mode=ImageReadMode.RGB)


def load_shard_sample(sample: dict) -> tuple[str, torch.Tensor]:
    data = sample["jpg"]
    try:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise ImageRejected("undecodable", str(error)) from error
    return hashlib.sha256(data).hexdigest(), image


class InputBatches(IterableDataset):
    """This rank's contiguous part of the inputs, in batches of `Loaded`; worker w loads batches w, w+W, ...

    The part is [N*rank/world, N*(rank+1)/world) of the input order, so ranks are disjoint and cover it all:
    for shards, the evaluation plan of train/shard_reader.py. Shard samples do not come through the training
    reader (train/readers.py) because extraction wants other things of them: the hash of the stored JPEG bytes
    (the image's key in the database), the sample's name, and an image that does not decode skipped and
    recorded rather than stopping the job; it has no use for targets.
    """

    def __init__(self, *, files: list[Path] | None = None, shards: list[Shard] | None = None, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        if (files is None) == (shards is None):
            raise ValueError("InputBatches needs either files or shards")
        self.files, self.shards, self.batch_size = files, shards, batch_size
        self.rank, self.world_size = rank, world_size
        total = len(files) if files is not None else sum(shard.num_samples for shard in shards)
        self.start, self.stop = total * rank // world_size, total * (rank + 1) // world_size

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def _readers(self) -> Iterator[tuple[int, str, Callable[[], tuple[str, torch.Tensor]]]]:
        """(index, source, read) for each input of the rank; `read` does the expensive part."""
        if self.files is not None:
            for index in range(self.start, self.stop):
                path = self.files[index]
                yield index, str(path), functools.partial(load_file, path)
            return
        segments = rank_segments(self.shards, seed=0, epoch=0, rank=self.rank, world_size=self.world_size,
                                 training=False)
        for index, sample in enumerate(segment_samples(segments), start=self.start):
            source = f"{Path(sample['__url__']).name}/{sample['__key__']}"
            yield index, source, functools.partial(load_shard_sample, sample)

    def __iter__(self) -> Iterator[list[Loaded]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        batch: list[tuple] = []
        batch_index = 0
        for reader in self._readers():
            batch.append(reader)
            if len(batch) == self.batch_size:
                if batch_index % num_workers == worker_id:
                    yield [_load(*item) for item in batch]
                batch, batch_index = [], batch_index + 1
        if batch and batch_index % num_workers == worker_id:
            yield [_load(*item) for item in batch]


def _load(index: int, source: str, read: Callable[[], tuple[str, torch.Tensor]]) -> Loaded:
    try:
        sha256, image = read()
    except ImageRejected as rejected:
        return Loaded(index, source, skipped=SkippedImage(source, rejected.reason, rejected.detail))
    return Loaded(index, source, image=image, sha256=sha256)
