"""Atomic file writes for everything that matters (shards, manifests, reports, checkpoints, configs, results).

A reader sees either the old file or the complete new one. `AtomicFile` is the one writer: the data goes to a
temporary file in the same directory (same filesystem, so the rename is atomic), is flushed and fsynced,
optionally verified, renamed over the destination, and the directory is fsynced so the rename survives a power
loss. Anything that goes wrong before the rename removes the temporary file and leaves the destination as it
was. The functions below it are conveniences that all go through it.

Temporary files are named `.{destination name}.{random}.tmp`: hidden, unique (two writers of the same
destination never share one), and mapped back to their destination by `temp_file_destination`, so that a
directory's owner can recognise and remove those a killed process left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<destination>.+)\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")
_COPY_CHUNK_BYTES = 1 << 20

Verify = Callable[[Path], None]  # checks the finished temporary file; raises to keep it from being published


def temp_file_destination(name: str) -> str | None:
    """The file name that a temporary file of `AtomicFile` called `name` was to become; None for other names."""
    match = _TEMP_NAME.match(name)
    return match.group("destination") if match else None


class AtomicFile:
    """A temporary file beside `path`, open for binary writing as `self.file`, that `publish` renames over `path`
    and `discard` removes. Use it directly when the writing spans several calls (the shard writer); otherwise
    use `write_atomically`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX, dir=self.path.parent)
        self.temp_path = Path(temp_name)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def publish(self, verify: Verify | None = None) -> None:
        """Fsync the data, run `verify` on the temporary file, rename it over `path` and fsync the directory."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if verify is not None:
                verify(self.temp_path)
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.discard()
            raise
        _fsync_directory(self.path.parent)

    def discard(self) -> None:
        """Drop what was written; `path` stays as it was."""
        self.file.close()
        self.temp_path.unlink(missing_ok=True)


def write_atomically(path: Path, write: Callable[[BinaryIO], Any], verify: Verify | None = None) -> None:
    """Call `write` with a binary file object (`torch.save(state, file)`, say) and publish what it wrote at
    `path`, after `verify` accepts it. An exception from either leaves `path` untouched and no temporary file."""
    atomic = AtomicFile(path)
    try:
        write(atomic.file)
    except BaseException:
        atomic.discard()
        raise
    atomic.publish(verify)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda file: file.write(data))


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode())


def write_json_atomically(path: Path, data: Any, indent: int | None = None) -> None:
    write_text_atomically(path, json.dumps(data, indent=indent) + "\n")


def copy_file_atomically(source: Path, destination: Path) -> None:
    """Copy `source` over `destination`. The copy is read back and compared with the bytes read from `source`
    before it is published, so a short or damaged copy never replaces a good file."""
    source_hash = hashlib.sha256()

    def copy(file: BinaryIO) -> None:
        with open(source, "rb") as original:
            while chunk := original.read(_COPY_CHUNK_BYTES):
                source_hash.update(chunk)
                file.write(chunk)

    def verify(temp_path: Path) -> None:
        if _sha256_of_file(temp_path) != source_hash.hexdigest():
            raise OSError(f"{destination}: the copy of {source} does not read back equal to it; not published")

    write_atomically(destination, copy, verify)


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
