"""One training manifest over several data_prep outputs, for one class list.

The shards are referenced in place (paths relative to the new manifest), nothing is copied: the reader takes
training labels from each annotation's original category id through the union manifest's class list, so
outputs that data_prep numbered for different class lists read correctly side by side.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from common import __version__
from data_prep.manifest import FORMAT_VERSION, load_manifest, write_manifest


def write_union_manifest(
    manifest_paths: Sequence[Path],
    categories: Sequence[Mapping],
    out_dir: Path,
    required_splits: Sequence[str],
) -> Path:
    """Write out_dir/manifest.json listing every split of every manifest, labelled for `categories`.

    `categories` must contain the categories of every manifest (see class_growth.union_categories). Splits in
    `required_splits` that no manifest has are listed empty, so that a reader asking for them finds them.
    Returns the new manifest's path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, dict] = {name: _empty_split() for name in required_splits}
    inputs = []
    for manifest_path in manifest_paths:
        manifest_path = Path(manifest_path)
        manifest = load_manifest(manifest_path)
        inputs += manifest["inputs"]
        _check_covered(manifest_path, manifest["categories"], categories)
        for split, entry in manifest["splits"].items():
            merged = splits.setdefault(split, _empty_split())
            merged["shards"] += [{**shard, "file": os.path.relpath(manifest_path.parent / shard["file"], out_dir)}
                                 for shard in entry["shards"]]
            merged["num_samples"] += entry["num_samples"]
            merged["image_ids"] += entry["image_ids"]
    _warn_about_repeated_image_ids(splits)
    path = out_dir / "manifest.json"
    write_manifest(path, {
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "arguments": {"union_of": [str(Path(p).resolve()) for p in manifest_paths]},
        "inputs": inputs,
        "categories": [dict(c) for c in categories],
        "splits": splits,
    })
    return path


def _empty_split() -> dict:
    return {"num_samples": 0, "shards": [], "image_ids": []}


def _check_covered(manifest_path: Path, own: Sequence[Mapping], target: Sequence[Mapping]) -> None:
    target_ids = {int(c["category_id"]) for c in target}
    missing = [int(c["category_id"]) for c in own if int(c["category_id"]) not in target_ids]
    if missing:
        raise ValueError(f"{manifest_path}: categories {missing} are not in the target class list")


def _warn_about_repeated_image_ids(splits: Mapping[str, Mapping]) -> None:
    # Evaluation keys images by id and scores one copy of a repeated id, so a repeat shrinks that split.
    for split, entry in splits.items():
        repeated = [image_id for image_id, count in Counter(entry["image_ids"]).items() if count > 1]
        if repeated:
            print(f"warning: split '{split}' of the union holds {len(repeated)} image ids more than once "
                  f"(first: {repeated[0]}); evaluation scores one copy of each", flush=True)
