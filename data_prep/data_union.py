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
from data_prep.class_list import ClassList
from data_prep.manifest import AttributeCensus, build_manifest, load_manifest, write_manifest
from data_prep.shard_writer import ShardInfo


def write_union_manifest(
    manifest_paths: Sequence[Path],
    classes: ClassList,
    out_dir: Path,
    required_splits: Sequence[str],
) -> Path:
    """Write out_dir/manifest.json listing every split of every manifest, labelled for `classes`.

    `classes` must contain the categories of every manifest (see ClassList.union). Splits in `required_splits`
    that no manifest has are listed empty, so that a reader asking for them finds them.
    Returns the new manifest's path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, tuple[list[ShardInfo], list[int]]] = {name: ([], []) for name in required_splits}
    inputs, attribute_records = [], []
    for manifest_path in manifest_paths:
        manifest_path = Path(manifest_path)
        manifest = load_manifest(manifest_path)
        inputs += manifest["inputs"]
        attribute_records.append(manifest.get("attributes", {}))
        _check_covered(manifest_path, ClassList.from_json(manifest["categories"], source=manifest_path), classes)
        for split, entry in manifest["splits"].items():
            shards, image_ids = splits.setdefault(split, ([], []))
            shards += [_shard_in_place(shard, manifest_path.parent, out_dir) for shard in entry["shards"]]
            image_ids += entry["image_ids"]
    _warn_about_repeated_image_ids(splits)
    path = out_dir / "manifest.json"
    write_manifest(path, build_manifest(
        tool_version=__version__,
        arguments={"union_of": [str(Path(p).resolve()) for p in manifest_paths]},
        inputs=inputs,
        classes=classes,
        splits=splits,
        attributes=AttributeCensus.merged(attribute_records),
    ))
    return path


def _shard_in_place(shard: Mapping, manifest_dir: Path, out_dir: Path) -> ShardInfo:
    """A manifest's shard record, its file relative to `out_dir`: the union references it where it is."""
    file = os.path.relpath(manifest_dir / shard["file"], out_dir)
    return ShardInfo(file, shard["num_samples"], shard["bytes"], shard["sha256"])


def _check_covered(manifest_path: Path, own: ClassList, target: ClassList) -> None:
    missing = [category_id for category_id in own.category_ids if category_id not in target]
    if missing:
        raise ValueError(f"{manifest_path}: categories {missing} are not in the target class list")


def _warn_about_repeated_image_ids(splits: Mapping[str, tuple[list[ShardInfo], list[int]]]) -> None:
    # Evaluation keys images by id and scores one copy of a repeated id, so a repeat shrinks that split.
    for split, (_, image_ids) in splits.items():
        repeated = [image_id for image_id, count in Counter(image_ids).items() if count > 1]
        if repeated:
            print(f"warning: split '{split}' of the union holds {len(repeated)} image ids more than once "
                  f"(first: {repeated[0]}); evaluation scores one copy of each", flush=True)
