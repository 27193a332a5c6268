"""The shards a run reads, checked against the manifest before the first step.

Sizes always: every rank stats every shard (cheap, and ranks on different nodes may read different copies).
With `data.verify_checksums` also the sha256 and sample count, which read every byte: shard i is checked by rank
i % world_size, so the set is read once in all and the time falls as ranks are added. (Rank 0 hashing every
shard would read the same bytes in 1/world_size of the ranks' time at best; each rank hashing the shards it
reads would not stay put, since the shards a rank reads change with every epoch's plan.) With node-local copies
each copy is then hashed only in part: `python -m data_prep verify` on each node checks a copy in full.

The ranks gather what they found and every rank raises the same ShardMismatchError, so none is left waiting in
a collective for a rank that stopped. Damage found later, mid-epoch, is the shard reader's error to report.
"""

from __future__ import annotations

import time
from pathlib import Path

from data_prep.verify import Mismatch, ShardRecord, check_shard, shard_records, size_mismatch
from train.shard_reader import Shard
from train.strategy import Strategy

MAX_LISTED = 20


class ShardMismatchError(ValueError):
    """A shard the run reads is missing or differs from what the manifest records."""


def _records(manifest_path: str | Path, shards: list[Shard]) -> list[ShardRecord]:
    by_path = {record.path: record for record in shard_records(manifest_path)}
    return [by_path[path] for path in dict.fromkeys(shard.path for shard in shards)]


def _message(manifest_path: str | Path, mismatches: list[Mismatch], checksums: bool) -> str:
    lines = [str(mismatch) for mismatch in mismatches[:MAX_LISTED]]
    if len(mismatches) > MAX_LISTED:
        lines.append(f"... and {len(mismatches) - MAX_LISTED} more")
    checked = "size, sha256 and sample count" if checksums else "size only; data.verify_checksums=true adds sha256"
    return (f"{len({m.path for m in mismatches})} shard(s) differ from {manifest_path} (checked {checked}):\n  "
            + "\n  ".join(lines)
            + f"\nre-create or re-copy them; `python -m data_prep verify {manifest_path}` checks every shard")


def check_shards(manifest_path: str | Path, shards: list[Shard], strategy: Strategy, *, checksums: bool) -> None:
    """Collective: raises ShardMismatchError on every rank if any rank found a shard that differs."""
    start = time.perf_counter()
    records = _records(manifest_path, shards)
    found = [mismatch for record in records if (mismatch := size_mismatch(record)) is not None]
    if checksums:
        mine = records[strategy.rank::strategy.world_size]
        found += [mismatch for record in mine for mismatch in check_shard(record) if mismatch.kind != "size"]
    everyone = [mismatch for rank_found in strategy.all_gather_object(found) for mismatch in rank_found]
    mismatches = list(dict.fromkeys(everyone))  # ranks that read the same copy find the same size mismatches
    if mismatches:
        raise ShardMismatchError(_message(manifest_path, mismatches, checksums))
    if strategy.is_main:
        what = "size, sha256 and sample count" if checksums else "size (data.verify_checksums=true hashes them)"
        print(f"shards: {len(records)} ({sum(r.bytes for r in records) / 1e6:.1f} MB) match the manifest: {what}; "
              f"{time.perf_counter() - start:.2f} s", flush=True)
