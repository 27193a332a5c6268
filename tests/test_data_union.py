"""data_prep.data_union: one manifest over several data_prep outputs, shards referenced in place."""

import pytest

from data_prep.class_list import ClassList
from data_prep.data_union import write_union_manifest
from data_prep.manifest import AttributeCensus, build_manifest, load_manifest, manifest_classes, write_manifest
from data_prep.shard_writer import ShardInfo


def write_source(directory, names, train_ids, val_ids=None, colours=()):
    """A data_prep-style manifest (no shard files are needed to list them); `colours`: annotation colours."""
    census = AttributeCensus()
    for colour in colours:
        census.add({"colour": colour})
    splits = {"train": ([ShardInfo("train-00000.tar", len(train_ids), 100, "a" * 64)], train_ids)}
    if val_ids is not None:
        splits["val"] = ([ShardInfo("val-00000.tar", len(val_ids), 50, "b" * 64)], val_ids)
    directory.mkdir(parents=True)
    write_manifest(directory / "manifest.json", build_manifest(
        tool_version="0", arguments={}, inputs=[{"annotations": f"{directory.name}.json"}],
        classes=ClassList.from_names(names), splits=splits, attributes=census))
    return directory / "manifest.json"


def test_union_lists_every_split_in_place_for_the_grown_class_list(tmp_path):
    old = write_source(tmp_path / "old", {1: "bottle", 7: "shoe"}, [1, 2], val_ids=[3], colours=["red", "blue"])
    new = write_source(tmp_path / "new", {1: "bottle", 4: "can"}, [11, 12, 13], colours=["red"])
    classes = ClassList.union([manifest_classes(old), manifest_classes(new)], [str(old), str(new)])

    path = write_union_manifest([old, new], classes, tmp_path / "round" / "data", ("train", "val", "test"))

    union = load_manifest(path)
    assert manifest_classes(path) == classes and union["categories"] == classes.to_json()
    assert union["inputs"] == [{"annotations": "old.json"}, {"annotations": "new.json"}]
    assert union["arguments"] == {"union_of": [str(old.resolve()), str(new.resolve())]}
    assert list(union["splits"]) == ["train", "val", "test"]
    train = union["splits"]["train"]
    assert [s["file"] for s in train["shards"]] == ["../../old/train-00000.tar", "../../new/train-00000.tar"]
    assert train["shards"][0] == {"file": "../../old/train-00000.tar", "num_samples": 2, "bytes": 100,
                                  "sha256": "a" * 64}
    assert train["num_samples"] == 5 and train["image_ids"] == [1, 2, 11, 12, 13]
    assert union["splits"]["val"]["num_samples"] == 1
    assert union["splits"]["test"] == {"num_samples": 0, "shards": [], "image_ids": []}
    assert union["attributes"] == {"colour": {"annotations": 3, "values": {"blue": 1, "red": 2},
                                              "values_cut": False}}


def test_a_class_list_without_a_manifests_category_is_refused(tmp_path):
    old = write_source(tmp_path / "old", {1: "bottle", 7: "shoe"}, [1])
    with pytest.raises(ValueError, match=r"old/manifest.json: categories \[7\] are not in the target class list"):
        write_union_manifest([old], ClassList.from_names({1: "bottle"}), tmp_path / "data", ("train",))
