"""Atomic file writes for everything that matters (shards, manifests, reports, checkpoints, results).

A reader sees either the old file or the complete new one: the data goes to a temporary file in the same
directory (same filesystem, so the rename is atomic), is fsynced and renamed, and the directory is fsynced so
the rename survives a power loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def write_json_atomically(path: Path, data: Any, indent: int | None = None) -> None:
    write_file_atomically(path, (json.dumps(data, indent=indent) + "\n").encode())
