"""manifest.json: what a shard directory holds (see docs/data_format.md), written last and read by training.

Its presence means the set is complete. The loader checks the format version and every key the training
side relies on, so a wrong or truncated file fails at start-up with the file and key named, not mid-epoch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from common.atomic_io import write_json_atomically
from data_prep.class_list import ClassList
from data_prep.shard_writer import ShardInfo

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "tool_version", "arguments", "inputs", "categories", "splits")
SPLIT_KEYS = ("num_samples", "shards", "image_ids")
SHARD_KEYS = ("file", "num_samples", "bytes", "sha256")


def build_manifest(
    *,
    tool_version: str,
    arguments: dict,
    inputs: list[dict],
    classes: ClassList,
    splits: dict[str, tuple[list[ShardInfo], list[int]]],
    attributes: AttributeCensus | None = None,
) -> dict:
    """splits: name -> (shards, image ids in sample order); shard files relative to the manifest's directory."""
    return {
        "format_version": FORMAT_VERSION,
        "tool_version": tool_version,
        "arguments": arguments,
        "inputs": inputs,
        "categories": classes.to_json(),
        "splits": {
            name: {
                "num_samples": len(image_ids),
                "shards": [
                    {"file": s.file, "num_samples": s.num_samples, "bytes": s.bytes, "sha256": s.sha256}
                    for s in shards
                ],
                "image_ids": image_ids,
            }
            for name, (shards, image_ids) in splits.items()
        },
        "attributes": (attributes or AttributeCensus()).to_json(),
    }


class AttributeCensus:
    """What the written annotations' `attributes` hold: per attribute name, how many annotations carry it and
    how often each value occurs (a value that is not a string is counted as its JSON text). A name with more
    than MAX_VALUES distinct values (free text, numbers) keeps the first MAX_VALUES and says it was cut."""

    MAX_VALUES = 100

    def __init__(self) -> None:
        self.annotations: Counter[str] = Counter()
        self.values: dict[str, Counter[str]] = {}
        self.cut: set[str] = set()

    def add(self, attributes: dict, count: int = 1) -> None:
        for name, value in attributes.items():
            self.add_value(name, value if isinstance(value, str) else json.dumps(value, sort_keys=True), count)
            self.annotations[name] += count

    def add_value(self, name: str, value: str, count: int) -> None:
        values = self.values.setdefault(name, Counter())
        if value in values or len(values) < self.MAX_VALUES:
            values[value] += count
        else:
            self.cut.add(name)

    @classmethod
    def merged(cls, records: Iterable[dict]) -> AttributeCensus:
        """The census of several manifests' `attributes` records (a manifest without one adds nothing)."""
        census = cls()
        for record in records:
            for name, entry in record.items():
                census.annotations[name] += entry["annotations"]
                for value, count in entry["values"].items():
                    census.add_value(name, value, count)
                if entry.get("values_cut"):
                    census.cut.add(name)
        return census

    def to_json(self) -> dict:
        return {name: {"annotations": self.annotations[name], "values": dict(sorted(self.values[name].items())),
                       "values_cut": name in self.cut}
                for name in sorted(self.annotations)}


def write_manifest(path: Path, manifest: dict) -> None:
    write_json_atomically(path, manifest, indent=2)


def _require(path: Path, mapping: object, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: {repr(where) if where else 'the top level'} must be a JSON object")
    for key in keys:
        if key not in mapping:
            raise ValueError(f"{path}: missing key '{where}.{key}'" if where else f"{path}: missing key '{key}'")


def load_manifest(path: str | Path) -> dict:
    """Parse and check a manifest; ValueError names the file and the first missing key."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read manifest: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error
    _require(path, manifest, ("format_version",), "")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest['format_version']!r} is not supported (expected {FORMAT_VERSION})"
        )
    _require(path, manifest, REQUIRED_KEYS, "")
    ClassList.from_json(manifest["categories"], source=path)  # checked here, so that training fails at start-up
    for name, split in manifest["splits"].items():
        _require(path, split, SPLIT_KEYS, f"splits.{name}")
        for index, shard in enumerate(split["shards"]):
            _require(path, shard, SHARD_KEYS, f"splits.{name}.shards[{index}]")
    return manifest


def manifest_classes(path: str | Path) -> ClassList:
    """The class list of the manifest at `path`."""
    return ClassList.from_json(load_manifest(path)["categories"], source=path)


def split_entry(manifest: dict, manifest_path: str | Path, split: str) -> dict:
    """The manifest's record of one split; the error names the manifest and the splits it has."""
    if split not in manifest["splits"]:
        raise ValueError(f"{manifest_path}: no split '{split}' (has {sorted(manifest['splits'])})")
    return manifest["splits"][split]


def shard_paths(manifest_path: str | Path, split: str) -> list[Path]:
    """The split's shard files, resolved relative to the manifest's directory."""
    manifest_path = Path(manifest_path)
    entry = split_entry(load_manifest(manifest_path), manifest_path, split)
    return [manifest_path.parent / shard["file"] for shard in entry["shards"]]
