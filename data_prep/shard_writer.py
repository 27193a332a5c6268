"""Deterministic WebDataset tar shards, atomic file writes, and the output directory's safety checks.

webdataset's own TarWriter stamps the current time into every member, so the tars are written here with
tarfile directly: USTAR format, mtime 0, uid/gid 0, empty owner names, mode 0644, members in the order
given. The same samples therefore give byte-identical shards. Every file is written through
common/atomic_io.py (temporary name, fsync, rename), so a reader never sees a partial shard.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from common.atomic_io import AtomicFile, temp_file_destination

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
SHARD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*-\d{5}\.tar$")
TAR_BLOCK = 512
TAR_RECORD = tarfile.RECORDSIZE  # tarfile pads the archive to a multiple of this on close


class OutputDirError(ValueError):
    """The output directory holds files this tool did not write."""


def _is_own_output(name: str) -> bool:
    name = temp_file_destination(name) or name
    return name in (MANIFEST_NAME, REPORT_NAME) or bool(SHARD_NAME.match(name))


def prepare_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Create out_dir, or accept a previous output of this tool (or any directory with overwrite).

    The old manifest is removed first: until the new one is written, the directory reads as incomplete.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(path.name for path in out_dir.iterdir())
    previous_output = (MANIFEST_NAME in names or REPORT_NAME in names) and all(map(_is_own_output, names))
    if names and not previous_output and not overwrite:
        raise OutputDirError(
            f"{out_dir}: not empty and not a previous data_prep output (holds {', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}); choose another directory or pass --overwrite"
        )
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)


def remove_stale_outputs(out_dir: Path, keep: set[str]) -> list[str]:
    """Remove shards and temporary files of an earlier run that the new output does not list."""
    removed = []
    for path in sorted(out_dir.iterdir()):
        stale_shard = SHARD_NAME.match(path.name) and path.name not in keep
        if stale_shard or (temp_file_destination(path.name) and _is_own_output(path.name)):
            path.unlink()
            removed.append(path.name)
    return removed


@dataclass(frozen=True)
class ShardInfo:
    file: str
    num_samples: int
    bytes: int
    sha256: str


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through, so a shard is never read back to be hashed."""

    def __init__(self, file):
        self._file = file
        self._hash = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._hash.update(data)
        self._file.write(data)
        self._size += len(data)
        return len(data)

    def tell(self) -> int:
        return self._size

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def member_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in a USTAR tar: a header block plus padded data."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def archive_bytes(content_bytes: int) -> int:
    """Size of a finished tar whose members take content_bytes: two zero blocks, padded to a record."""
    return -(-(content_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


class ShardWriter:
    """Writes one split's samples as {split}-00000.tar, {split}-00001.tar, ...

    A new shard starts when the current one holds max_count samples or the next sample would take it past
    max_bytes (a sample larger than max_bytes gets a shard of its own). Use as a context manager: leaving it
    with an exception removes the unfinished temporary shard.
    """

    def __init__(self, out_dir: Path, split: str, *, max_count: int, max_bytes: int):
        self.out_dir, self.split = out_dir, split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shards: list[ShardInfo] = []
        self._out: AtomicFile | None = None
        self._hashing = self._tar = None
        self._count = self._content_bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self._finish_shard()
        elif self._out is not None:
            self._out.discard()

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):05d}.tar"

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Add one sample: members are (extension, data), written as KEY.extension in the order given."""
        size = sum(member_bytes(len(data)) for _, data in members)
        full = self._count >= self.max_count
        too_big = archive_bytes(self._content_bytes + size) > self.max_bytes
        if self._tar is not None and (full or too_big):
            self._finish_shard()
        if self._tar is None:
            self._out = AtomicFile(self.out_dir / self._name())
            self._hashing = _HashingFile(self._out.file)
            self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._content_bytes += size

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._out.publish()
        self.shards.append(ShardInfo(self._name(), self._count, self._hashing.tell(), self._hashing.hexdigest()))
        self._out = self._hashing = self._tar = None
        self._count = self._content_bytes = 0
