"""Damaged copies of a real shard set: flipped bytes at known places of a tar (a member's header, a JPEG's pixel
data), so tests can show what the reader, `data_prep verify` and training's start-up check make of them."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path


def copy_set(manifest: Path, destination: Path) -> Path:
    """A copy of a data_prep output directory; returns the copy's manifest."""
    shutil.copytree(manifest.parent, destination)
    return destination / manifest.name


def flip(path: Path, offset: int, count: int = 1, mask: int = 0xFF) -> None:
    """XOR `count` bytes from `offset` with `mask`, in place: the size stays the same."""
    data = bytearray(path.read_bytes())
    for index in range(offset, offset + count):
        data[index] ^= mask
    path.write_bytes(data)


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def pixel_byte_offset(path: Path, member: tarfile.TarInfo) -> int:
    """Where in the tar the first byte of a JPEG member's entropy-coded (pixel) data is that an XOR with 0x80 leaves
    an ordinary data byte: not 0xFF, not after 0xFF, so no marker or byte stuffing is touched. Flipping it changes
    the first block's DC value, which every later block's is coded relative to: the image decodes, damaged."""
    with tarfile.open(path) as tar:
        jpeg = tar.extractfile(member).read()
    sos = jpeg.index(b"\xff\xda")
    offset = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    while 0xFF in (jpeg[offset - 1], jpeg[offset], jpeg[offset] ^ 0x80):
        offset += 1
    return member.offset_data + offset
