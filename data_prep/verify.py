"""Check every shard of a manifest: its file exists, has the recorded size and sha256, and holds as many samples.

    python -m data_prep verify OUT/manifest.json [--num-workers N]

The shard writer records each shard's bytes, sha256 and sample count in the manifest as it writes the file.
A shard is read once, in 1 MiB chunks, through a hash while a streaming tar reader counts its samples, so it
is never held in memory; shards are checked in parallel by worker processes. Samples are counted the way the
training reader groups tar members (webdataset: consecutive members with the same key), so a damaged header,
after which Python's tarfile ends the archive without an error, shows up as a short count. Every mismatch is
printed and the exit status is 1 if there is any (2 if the manifest itself cannot be read).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from data_prep.manifest import load_manifest
from data_prep.shard import _non_negative_int
from data_prep.workers import Workers, progress_bar

HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest says one shard file holds; `path` is resolved against the manifest's directory."""

    split: str
    path: Path
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Mismatch:
    """One way a shard differs from its record. kind: missing, size, sha256, samples or unreadable."""

    path: Path
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.detail}"


def shard_records(manifest_path: str | Path) -> list[ShardRecord]:
    """Every shard of every split, in manifest order."""
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path)
    return [
        ShardRecord(split, manifest_path.parent / shard["file"], int(shard["num_samples"]), int(shard["bytes"]),
                    str(shard["sha256"]))
        for split, entry in manifest["splits"].items()
        for shard in entry["shards"]
    ]


def size_mismatch(record: ShardRecord) -> Mismatch | None:
    """A stat: the file is missing or its size is not the recorded one."""
    try:
        size = record.path.stat().st_size
    except FileNotFoundError:
        return Mismatch(record.path, "missing", "no such file")
    except OSError as error:
        return Mismatch(record.path, "missing", f"cannot stat: {error.strerror or error}")
    if size != record.bytes:
        return Mismatch(record.path, "size", f"{size} bytes, the manifest records {record.bytes}")
    return None


class _HashingReader(io.RawIOBase):
    """A read-only file that hashes every byte read through it, in the order read."""

    def __init__(self, file):
        self._file = file
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._file.readinto(buffer)
        self.hash.update(memoryview(buffer)[:count])
        return count

    def drain(self) -> None:
        while chunk := self._file.read(HASH_CHUNK):
            self.hash.update(chunk)


def _count_samples(stream: io.BufferedReader) -> int:
    """Samples as the training reader groups members: consecutive regular files with the same key."""
    count, key = 0, None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            prefix, _ = base_plus_ext(member.name)
            if member.isreg() and prefix is not None and prefix != key:
                count, key = count + 1, prefix
    return count


def check_shard(record: ShardRecord) -> list[Mismatch]:
    """Size, then sha256 and sample count in one streamed pass; every mismatch found (empty: the shard is good)."""
    if (mismatch := size_mismatch(record)) is not None and mismatch.kind == "missing":
        return [mismatch]
    mismatches = [mismatch] if mismatch else []
    with open(record.path, "rb", buffering=0) as file:
        hashing = _HashingReader(file)
        try:
            count = _count_samples(io.BufferedReader(hashing, HASH_CHUNK))
        except (tarfile.TarError, OSError) as error:
            count = None
            mismatches.append(Mismatch(record.path, "unreadable", f"not a readable tar: {error}"))
        hashing.drain()
    if hashing.hash.hexdigest() != record.sha256:
        mismatches.append(Mismatch(record.path, "sha256", f"{hashing.hash.hexdigest()}, the manifest records "
                                                          f"{record.sha256}"))
    if count is not None and count != record.num_samples:
        mismatches.append(Mismatch(record.path, "samples", f"{count} samples, the manifest records "
                                                           f"{record.num_samples}"))
    return mismatches


def verify_shards(records: list[ShardRecord], num_workers: int, show_progress: bool = True) -> list[Mismatch]:
    """Every mismatch of every shard, in manifest order."""
    mismatches: list[Mismatch] = []
    with Workers(num_workers) as workers:
        results = workers.ordered_map(check_shard, records, chunksize=1)
        if show_progress:
            results = progress_bar(results, len(records), "verify", unit="shard")
        for found in results:
            mismatches += found
    return mismatches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="manifest.json of a data_prep output (or of a union)")
    parser.add_argument("--num-workers", type=_non_negative_int, default=min(8, os.cpu_count() or 1),
                        help="worker processes that read shards (0: read in this process)")


def summary(records: list[ShardRecord], mismatches: list[Mismatch], seconds: float) -> str:
    total_bytes = sum(record.bytes for record in records)
    checked = (f"{len(records)} shards, {sum(r.num_samples for r in records)} samples, {total_bytes / 1e6:.1f} MB "
               f"in {seconds:.1f} s")
    if not mismatches:
        return f"OK: {checked}: every size, sha256 and sample count matches the manifest"
    kinds = {kind: sum(m.kind == kind for m in mismatches) for kind in dict.fromkeys(m.kind for m in mismatches)}
    bad = len({m.path for m in mismatches})
    return (f"FAILED: {bad} of {len(records)} shards differ from the manifest "
            f"({', '.join(f'{count} {kind}' for kind, count in kinds.items())}); checked {checked}")


def run(args: argparse.Namespace) -> int:
    try:
        records = shard_records(args.manifest)
    except ValueError as error:
        print(f"data_prep verify: error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    mismatches = verify_shards(records, args.num_workers)
    for mismatch in mismatches:
        print(mismatch)
    print(summary(records, mismatches, time.perf_counter() - start))
    return 1 if mismatches else 0
