"""Damaged shards: what the shard reader, `python -m data_prep verify` and training's start-up check make of them.

    python bench/damaged_shards.py --num-images 60 --image-size 320 --stride 512

On a synthetic set sharded 16 samples a shard (about 18 kB a sample at 320 px):
1. A window of 2,000 bytes flipped (XOR 0xFF) in the middle of a train shard, then at every `stride` bytes of
   it: how reading that shard ends (as training reads it) and what verify reports; a training run on the first.
2. One byte flipped inside the entropy-coded pixel data of one JPEG (mid-way, then at its first byte, which
   shifts every later block's DC value): the image still decodes, damaged; the reader yields it without a word,
   a real training run trains on it, verify and `data.verify_checksums=true` catch it.
3. verify's time on the set with 0, 1 and 2 workers, and training's start-up check without and with checksums.

Writes markdown to stdout (copy it into docs/benchmarks.md with the machine, date and commit).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from data_prep.__main__ import main as data_prep_main
from data_prep.synth import write_synthetic_coco
from data_prep.verify import ShardRecord, check_shard, shard_records, verify_shards
from train.shard_check import check_shards
from train.shard_reader import Shard, ShardBatches, ShardLoader, ShardReadError
from train.strategy import Strategy

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 2000


def make_set(root: Path, num_images: int, image_size: int) -> Path:
    annotations = write_synthetic_coco(root / "raw", num_images=num_images, image_size=image_size, seed=0)
    assert data_prep_main(["shard", "--input", f"{annotations}:{root / 'raw' / 'images'}", "--out",
                           str(root / "shards"), "--splits", "train=0.8,val=0.1,test=0.1",
                           "--shard-max-count", "16", "--num-workers", "1"]) == 0
    return root / "shards" / "manifest.json"


def flipped_copy(src: Path, dst: Path, start: int, count: int, mask: int = 0xFF) -> Path:
    data = bytearray(src.read_bytes())
    for index in range(start, start + count):
        data[index] ^= mask
    dst.write_bytes(data)
    return dst


def read_outcome(path: Path, num_samples: int) -> str:
    """How reading the whole shard as training does (one rank, no workers) ends."""
    dataset = ShardBatches([Shard(path, num_samples)], batch_size=2, seed=0, epoch=0, shuffle_buffer=0)
    try:
        read = sum(len(targets) for _, targets in ShardLoader(dataset, num_workers=0, pin_memory=False))
    except ShardReadError as error:
        names_both = path.name in str(error) and "sample 0000" in str(error)
        return "error naming shard and sample" if names_both else f"error: {error}"
    except Exception as error:  # noqa: BLE001 - the point is to see every way it ends
        return f"other error {type(error).__name__}"
    return "read silently, all samples" if read == num_samples else f"read silently, {read} of {num_samples} samples"


def window_sweep(record: ShardRecord, work: Path, stride: int) -> None:
    middle = record.bytes // 2 - WINDOW // 2
    starts = [middle] + list(range(0, record.bytes - WINDOW, stride))
    outcomes: collections.Counter = collections.Counter()
    verify_kinds: collections.Counter = collections.Counter()
    for index, start in enumerate(starts):
        damaged = flipped_copy(record.path, work / record.path.name, start, WINDOW)
        outcome = read_outcome(damaged, record.num_samples)
        kinds = "+".join(m.kind for m in check_shard(ShardRecord(record.split, damaged, record.num_samples,
                                                                 record.bytes, record.sha256)))
        if index == 0:
            print(f"\n2,000 bytes flipped at {start} (middle of {record.path.name}, {record.bytes} bytes): "
                  f"reader: {outcome}; verify: {kinds}")
            continue
        outcomes[outcome] += 1
        verify_kinds[kinds] += 1
    print(f"\n| 2,000-byte window at every {stride} bytes ({len(starts) - 1} positions) | positions |\n| --- | --- |")
    for outcome, count in outcomes.most_common():
        print(f"| reader: {outcome} | {count} |")
    for kinds, count in verify_kinds.most_common():
        print(f"| verify reports: {kinds or 'nothing'} | {count} |")


def decode(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def pixel_flip(src: Path, out: Path, fraction: float) -> str:
    """Flip one byte (XOR 0x80) at `fraction` of the first JPEG's entropy-coded data; returns the sample key."""
    with tarfile.open(src) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        data = tar.extractfile(member).read()
    scan = data.index(b"\xff\xda") + 2 + int.from_bytes(data[data.index(b"\xff\xda") + 2:][:2], "big")
    offset = scan + int((len(data) - scan) * fraction)
    while 0xFF in (data[offset - 1], data[offset], data[offset] ^ 0x80):  # keep markers and byte stuffing intact
        offset += 1
    flipped_copy(src, out, member.offset_data + offset, 1, mask=0x80)
    with tarfile.open(out) as tar:
        damaged = tar.extractfile(member.name).read()
    difference = (decode(data).int() - decode(damaged).int()).abs()
    changed = difference.amax(0) > 0
    print(f"\none byte flipped (XOR 0x80) at byte {offset - scan} of the {len(data) - scan} bytes of pixel data of "
          f"{member.name} in {out.name}: decodes; {int(changed.sum())} of {changed.numel()} pixels changed, by up "
          f"to {int(difference.max())} levels (mean {float(difference.float().mean()):.1f})")
    return member.name.split(".")[0]


def run_training(manifest: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [f"data.manifest={manifest}", f"run_dir={run_dir}", "strategy=single", "wandb.mode=disabled",
                 "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=160", "model.max_size=192",
                 "data.num_workers=0", "eval.every_epochs=0", "eval.test_at_end=false", "train.epochs=1", *extra]
    return subprocess.run([sys.executable, "train/main.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1200)


def mid_epoch_failure(manifest: Path, work: Path) -> None:
    """A training run on a set whose first train shard has 2,000 bytes flipped in the middle."""
    copy = work / "window"
    shutil.copytree(manifest.parent, copy)
    record = next(r for r in shard_records(copy / "manifest.json") if r.split == "train")
    flipped_copy(manifest.parent / record.path.name, record.path, record.bytes // 2 - WINDOW // 2, WINDOW)
    result = run_training(copy / "manifest.json", work / "run_window")
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    print(f"\ntraining one epoch on it: exit {result.returncode} after {steps[-1] if steps else 'no logged step'}; "
          f"{result.stderr.strip().splitlines()[-1]}")


def silent_damage(manifest: Path, work: Path) -> None:
    copy = work / "pixel"
    shutil.copytree(manifest.parent, copy)
    record = next(r for r in shard_records(copy / "manifest.json") if r.split == "train")
    pixel_flip(manifest.parent / record.path.name, record.path, fraction=0.5)
    key = pixel_flip(manifest.parent / record.path.name, record.path, fraction=0.0)
    print(f"reader on that shard: {read_outcome(record.path, record.num_samples)}")
    print("verify: " + "; ".join(map(str, check_shard(record))))
    plain = run_training(copy / "manifest.json", work / "run_plain")
    print(f"training one epoch on it (an epoch reads every sample, {key} included), data.verify_checksums=false: "
          f"exit {plain.returncode}; {[line for line in plain.stdout.splitlines() if line.startswith('[')][-2:]}")
    checked = run_training(copy / "manifest.json", work / "run_checked", "data.verify_checksums=true")
    print(f"the same with data.verify_checksums=true: exit {checked.returncode}; "
          f"{checked.stderr.strip().splitlines()[-3:]}")


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def timings(manifest: Path, repeats: int) -> None:
    """Each variant once per round, `repeats` rounds: on a shared machine the load then falls on all alike."""
    records = shard_records(manifest)
    megabytes = sum(r.bytes for r in records) / 1e6
    shards = [Shard(r.path, r.num_samples) for r in records]
    strategy = Strategy("single", torch.device("cpu"))

    def start_check(checksums: bool) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            check_shards(manifest, shards, strategy, checksums=checksums)

    variants = {f"data_prep verify, {w} workers": partial(verify_shards, records, w, show_progress=False)
                for w in (0, 1, 2)}
    variants.update({f"training start-up check, checksums={c}": partial(start_check, c) for c in (False, True)})
    seconds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            seconds[name].append(timed(function))
    print(f"\n| check ({len(records)} shards, {megabytes:.1f} MB; median of {repeats}) | seconds | MB/s |\n"
          "| --- | --- | --- |")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.4f} | {megabytes / median:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true", help="leave out the two training runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = make_set(work / "set", args.num_images, args.image_size)
        train_shard = next(r for r in shard_records(manifest) if r.split == "train")
        window_sweep(train_shard, work, args.stride)
        if not args.skip_training:
            mid_epoch_failure(manifest, work)
            silent_damage(manifest, work)
        timings(manifest, args.repeats)


if __name__ == "__main__":
    main()
