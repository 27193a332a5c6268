"""Data-layer benchmark: data_prep against plain `tar`, the shard reader against a file-per-image loader and
against bare JPEG decoding of the same bytes.

    python bench/data_loading.py --num-images 1000 --image-size 640 --workers 1 2

Writes a markdown table to stdout (copy it into docs/benchmarks.md with the machine and the command).
Each loader runs in a fresh process; peak memory per worker is the max RSS of its DataLoader workers
(or of the process itself with 0 workers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import CocoDetection
from torchvision.io import ImageReadMode, decode_jpeg

from data_prep.__main__ import main as data_prep_main
from data_prep.synth import write_synthetic_coco
from train.shard_reader import ShardBatches, ShardLoader, iter_raw_samples, split_shards


def decode_bytes(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


class FilePerImage(CocoDetection):
    """torchvision's CocoDetection with the reader's decoding (every worker parses the annotation file)."""

    def _load_image(self, id: int) -> torch.Tensor:
        path = Path(self.root) / self.coco.loadImgs(id)[0]["file_name"]
        return decode_bytes(path.read_bytes())


def collate(batch):
    return tuple(zip(*batch, strict=True))


def time_loader(make, num_workers: int, queue) -> None:
    """Runs in a child process so that its peak RSS (and its workers') is its own."""
    start = time.perf_counter()
    first = None
    count = 0
    for images, _ in make(num_workers):
        if first is None:
            first = time.perf_counter() - start
        count += len(images)
    elapsed = time.perf_counter() - start
    who = resource.RUSAGE_CHILDREN if num_workers else resource.RUSAGE_SELF
    queue.put({"samples": count, "seconds": elapsed, "first_batch_s": first,
               "peak_rss_mb": resource.getrusage(who).ru_maxrss / 1024})


def measure(make, num_workers: int) -> dict:
    queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=time_loader, args=(make, num_workers, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    annotations = write_synthetic_coco(root / "raw", num_images=args.num_images, image_size=args.image_size, seed=0)
    images_dir = root / "raw" / "images"

    start = time.perf_counter()
    data_prep_main(["shard", "--input", f"{annotations}:{images_dir}", "--out", str(root / "shards"),
                    "--splits", "train=1.0", "--num-workers", "2"])
    prep_seconds = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["tar", "-cf", str(root / "plain.tar"), "-C", str(root / "raw"), "images"], check=True)
    tar_seconds = time.perf_counter() - start

    shards = split_shards(root / "shards" / "manifest.json", "train")
    all_bytes = [s["jpg"] for shard in shards for s in iter_raw_samples(shard.path)]
    start = time.perf_counter()
    for data in all_bytes:
        decode_bytes(data)
    bare_rate = len(all_bytes) / (time.perf_counter() - start)

    def reader(num_workers):
        dataset = ShardBatches(shards, batch_size=args.batch_size, seed=0, epoch=0, training=False)
        return ShardLoader(dataset, num_workers=num_workers, pin_memory=False)

    def file_per_image(num_workers):
        dataset = FilePerImage(str(images_dir), str(annotations))
        return DataLoader(dataset, batch_size=args.batch_size, num_workers=num_workers, collate_fn=collate)

    n = len(all_bytes)
    shard_mb = sum(shard.path.stat().st_size for shard in shards) / 1e6
    print(f"{n} synthetic images of {args.image_size} px; shards {shard_mb:.1f} MB\n")
    print("| step | images/s |\n| --- | --- |")
    print(f"| data_prep shard (2 processes, validate + write) | {n / prep_seconds:.0f} |")
    print(f"| plain `tar -cf` of the same files | {n / tar_seconds:.0f} |\n")
    print("| loader | workers | samples/s | samples/s per worker | first batch (s) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| bare decode_jpeg of the same bytes (1 process) | 0 | {bare_rate:.0f} | {bare_rate:.0f} | - | - |")
    for name, make in (("shard reader", reader), ("file-per-image CocoDetection", file_per_image)):
        for workers in args.workers:
            r = measure(make, workers)
            rate = r["samples"] / r["seconds"]
            print(f"| {name} | {workers} | {rate:.0f} | {rate / max(workers, 1):.0f} | {r['first_batch_s']:.2f} "
                  f"| {r['peak_rss_mb']:.0f} |")
    print(json.dumps({"root": str(root)}))


if __name__ == "__main__":
    main()
