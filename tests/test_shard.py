"""`python -m data_prep shard` end to end: real COCO-format inputs in, real shards read back with webdataset."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.__main__ import main as data_prep_main
from data_prep.manifest import load_manifest, shard_paths
from data_prep.synth import write_synthetic_coco
from data_prep.workers import PENDING_CHUNKS_PER_WORKER, Workers

# ---- helpers, also used by the other test_shard_* files -------------------------------------------------


def run_shard(*arguments: str) -> int:
    return data_prep_main(["shard", *arguments])


def shard_ok(out: Path, *inputs: str, **options) -> dict:
    """Shard into out and return the manifest; options are --flag values (True for a bare flag)."""
    arguments = [argument for text in inputs for argument in ("--input", text)] + ["--out", str(out)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        arguments += [flag] if value is True else [flag, str(value)]
    assert run_shard(*arguments) == 0
    return load_manifest(out / "manifest.json")


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def read_split(manifest_path: Path, split: str) -> list[tuple[str, bytes, dict]]:
    """(key, jpg bytes, json) of every sample of the split, in shard order, read with webdataset."""
    urls = [str(path) for path in shard_paths(manifest_path, split)]
    if not urls:
        return []
    return [(sample["__key__"], sample["jpg"], json.loads(sample["json"]))
            for sample in wds.WebDataset(urls, shardshuffle=False)]


def synth_set(root: Path, num_images: int = 30, seed: int = 0) -> tuple[Path, Path]:
    """A synthetic product set: (annotation file, image folder)."""
    annotations = write_synthetic_coco(root, num_images=num_images, image_size=80, seed=seed)
    return annotations, root / "images"


def spec(annotations: Path, images: Path) -> str:
    return f"{annotations}:{images}"


def load_coco_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_coco_json(path: Path, coco: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def pixels(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return np.asarray(image.convert("RGB"))


def xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def check_balanced(report: dict) -> None:
    images, annotations = report["images"], report["annotations"]
    assert images["in"] == images["written"] + images["rejected"]
    assert annotations["in"] == annotations["written"] + annotations["dropped"]
    assert sum(images["rejected_by_reason"].values()) == images["rejected"]
    assert sum(annotations["dropped_by_reason"].values()) == annotations["dropped"]
    for kind, by_reason in (("image_rejected", images["rejected_by_reason"]),
                            ("image_fixed", images["fixed_by_reason"]),
                            ("annotation_dropped", annotations["dropped_by_reason"]),
                            ("annotation_fixed", annotations["fixed_by_reason"])):
        for reason, count in by_reason.items():
            assert sum(e["kind"] == kind and e["reason"] == reason for e in report["events"]) == count


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.tar"))}


# ---- tests ----------------------------------------------------------------------------------------------


def test_every_sample_reads_back_with_its_pixels_and_boxes(tmp_path):
    annotations, images = synth_set(tmp_path / "synth", num_images=40)
    out = tmp_path / "out"
    manifest = shard_ok(out, spec(annotations, images), splits="train=0.6,val=0.2,test=0.2",
                        shard_max_count=5, num_workers=2)
    source = load_coco_json(annotations)
    source_images = {image["id"]: image for image in source["images"]}
    category_ids = sorted(c["id"] for c in source["categories"])
    assert [c["category_id"] for c in manifest["categories"]] == category_ids
    assert [c["label"] for c in manifest["categories"]] == list(range(1, len(category_ids) + 1))
    label_of = {c["category_id"]: c["label"] for c in manifest["categories"]}

    seen = []
    for split, entry in manifest["splits"].items():
        samples = read_split(out / "manifest.json", split)
        assert [meta["image_id"] for _, _, meta in samples] == entry["image_ids"]
        assert entry["num_samples"] == len(samples) == sum(s["num_samples"] for s in entry["shards"])
        assert all(s["num_samples"] <= 5 for s in entry["shards"])
        for shard in entry["shards"]:
            data = (out / shard["file"]).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
        for key, jpg, meta in samples:
            image = source_images[meta["image_id"]]
            assert key == f"{image['id']:012d}"
            assert (meta["file_name"], meta["source"]) == (image["file_name"], "instances.json")
            assert (meta["width"], meta["height"]) == (image["width"], image["height"])
            np.testing.assert_array_equal(pixels(jpg), pixels(images / image["file_name"]))
            expected = sorted((a for a in source["annotations"] if a["image_id"] == image["id"]),
                              key=lambda a: a["id"])
            assert [a["id"] for a in meta["annotations"]] == [a["id"] for a in expected]
            for stored, original in zip(meta["annotations"], expected, strict=True):
                assert stored["bbox"] == pytest.approx(xyxy(original["bbox"]))
                assert stored["category_id"] == original["category_id"]
                assert stored["label"] == label_of[original["category_id"]]
                assert (stored["iscrowd"], stored["area"]) == (original["iscrowd"], original["area"])
                assert stored["attributes"] == original["attributes"]  # e.g. {"colour": "red"}, passed through
        seen += entry["image_ids"]
    assert sorted(seen) == sorted(source_images)  # every image once: the splits are disjoint and complete
    report = read_report(out)
    check_balanced(report)
    assert (report["images"]["in"], report["images"]["written"]) == (40, 40)
    assert report["annotations"]["in"] == report["annotations"]["written"] == len(source["annotations"])
    assert manifest["inputs"] == [{"annotations": str(annotations), "images": str(images), "test_input": False,
                                   "sha256": hashlib.sha256(annotations.read_bytes()).hexdigest()}]
    assert manifest["arguments"]["splits"] == "train=0.6,val=0.2,test=0.2"
    colours = Counter(a["attributes"]["colour"] for a in source["annotations"])
    assert manifest["attributes"] == {"colour": {"annotations": len(source["annotations"]),
                                                 "values": dict(sorted(colours.items())), "values_cut": False}}
    assert not list(out.glob("*.tmp"))


def test_annotation_attributes_that_are_not_an_object_are_dropped_with_the_box_kept(tmp_path):
    annotations, images = synth_set(tmp_path / "synth", num_images=6)
    coco = load_coco_json(annotations)
    coco["annotations"][0]["attributes"] = "red"  # not an object: dropped, the box is kept
    del coco["annotations"][1]["attributes"]  # none: nothing to carry
    coco["annotations"][2]["attributes"] = {"colour": "red", "material": "glass", "tags": ["a", "b"]}
    write_coco_json(annotations, coco)
    out = tmp_path / "out"
    manifest = shard_ok(out, spec(annotations, images), splits="train=1.0")
    stored = {a["id"]: a for _, _, meta in read_split(out / "manifest.json", "train") for a in meta["annotations"]}
    assert len(stored) == len(coco["annotations"])
    assert "attributes" not in stored[1] and "attributes" not in stored[2]
    assert stored[3]["attributes"] == {"colour": "red", "material": "glass", "tags": ["a", "b"]}
    report = read_report(out)
    assert report["annotations"]["fixed_by_reason"] == {"attributes_dropped": 1}
    census = manifest["attributes"]
    assert census["colour"]["annotations"] == len(coco["annotations"]) - 2
    assert census["material"] == {"annotations": 1, "values": {"glass": 1}, "values_cut": False}
    assert census["tags"]["values"] == {'["a", "b"]': 1}


def test_shards_are_byte_identical_with_more_workers_and_shuffled_input(tmp_path):
    annotations, images = synth_set(tmp_path / "synth", num_images=24)
    coco = load_coco_json(annotations)
    # Some images need re-encoding and some boxes clipping, so those paths are covered too.
    for image in coco["images"][:3]:
        with Image.open(images / image["file_name"]) as original:
            image["file_name"] = image["file_name"].replace(".jpg", ".png")
            (original.convert("L") if image["id"] % 2 else original).save(images / image["file_name"])
    coco["annotations"][0]["bbox"][0] = -5.0
    write_coco_json(annotations, coco)
    shuffled = dict(coco, images=coco["images"][:], annotations=coco["annotations"][:])
    random.Random(0).shuffle(shuffled["images"])
    random.Random(1).shuffle(shuffled["annotations"])
    shuffled_annotations = write_coco_json(tmp_path / "shuffled" / "instances.json", shuffled)

    first = shard_ok(tmp_path / "a", spec(annotations, images), shard_max_count=4, num_workers=1)
    second = shard_ok(tmp_path / "b", spec(shuffled_annotations, images), shard_max_count=4, num_workers=2)
    third = shard_ok(tmp_path / "c", spec(annotations, images), shard_max_count=4, num_workers=0)
    assert len(shard_bytes(tmp_path / "a")) >= 5
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b") == shard_bytes(tmp_path / "c")
    assert first["splits"] == second["splits"] == third["splits"]
    assert read_report(tmp_path / "a")["images"]["fixed_by_reason"]["reencoded_to_jpeg"] == 3
    assert read_report(tmp_path / "a")["annotations"]["fixed_by_reason"]["clipped_to_image"] == 1


def test_split_counts_are_exact_and_the_rest_is_left_out(tmp_path, capsys):
    annotations, images = synth_set(tmp_path / "synth", num_images=30)
    manifest = shard_ok(tmp_path / "out", spec(annotations, images), splits="train=12,val=5,test=3")
    assert "not drawn    10 of 30 images (by split counts)" in capsys.readouterr().out
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "val", "test")] == [12, 5, 3]
    ids = [set(manifest["splits"][s]["image_ids"]) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    report = read_report(tmp_path / "out")
    check_balanced(report)
    assert report["images"]["in"] == 20
    assert report["selection"]["images_not_drawn_by_split_counts"] == 10


@pytest.mark.parametrize("split_key", ["id", "content"])
def test_subsample_is_reproducible(tmp_path, split_key):
    annotations, images = synth_set(tmp_path / "synth", num_images=30)
    runs = [shard_ok(tmp_path / name, spec(annotations, images), subsample=count, split_key=split_key,
                     splits="train=0.5,val=0.5")
            for name, count in (("a", 12), ("b", 12), ("c", 18))]
    drawn = [{i for split in run["splits"].values() for i in split["image_ids"]} for run in runs]
    assert len(drawn[0]) == 12 and drawn[0] == drawn[1]
    assert runs[0]["splits"] == runs[1]["splits"]
    assert len(drawn[2]) == 18 and drawn[2] > drawn[0]
    report = read_report(tmp_path / "a")
    check_balanced(report)
    assert report["images"]["in"] == 12
    assert report["selection"]["images_not_drawn_by_subsample"] == 18
    in_annotations = sum(1 for a in load_coco_json(annotations)["annotations"] if a["image_id"] in drawn[0])
    assert report["annotations"]["in"] == in_annotations


def renumbered_copy(annotations: Path, images: Path, destination: Path, offset: int) -> tuple[Path, Path]:
    """The set with every image and annotation id shifted by offset, so it can be an input beside the original."""
    coco = load_coco_json(annotations)
    for image in coco["images"]:
        image["id"] += offset
    for annotation in coco["annotations"]:
        annotation["id"] += offset
        annotation["image_id"] += offset
    return write_coco_json(destination / "instances_test.json", coco), images


def test_test_input_is_the_test_split_as_it_is(tmp_path, capsys):
    train_annotations, train_images = synth_set(tmp_path / "train", num_images=20, seed=0)
    test_annotations, test_images = renumbered_copy(*synth_set(tmp_path / "test", num_images=10, seed=1),
                                                    tmp_path / "test", offset=1000)
    out = tmp_path / "out"
    manifest = shard_ok(out, spec(train_annotations, train_images), test_input=spec(test_annotations, test_images),
                        splits="train=0.75,val=0.25")
    assert set(manifest["splits"]) == {"train", "val", "test"}
    assert sorted(manifest["splits"]["test"]["image_ids"]) == list(range(1001, 1011))
    assert sorted(manifest["splits"]["train"]["image_ids"] + manifest["splits"]["val"]["image_ids"]) == list(
        range(1, 21))
    test_samples = read_split(out / "manifest.json", "test")
    assert all(meta["source"] == "instances_test.json" for _, _, meta in test_samples)
    assert [m["test_input"] for m in manifest["inputs"]] == [True, False]
    assert "test" in capsys.readouterr().out

    code = run_shard("--input", spec(train_annotations, train_images), "--out", str(tmp_path / "bad"),
                     "--test-input", spec(test_annotations, test_images), "--splits", "train=0.8,test=0.2")
    assert code == 2
    assert "--test-input" in capsys.readouterr().err


def test_duplicate_content_keeps_one_and_rejects_the_rest(tmp_path):
    annotations, images = synth_set(tmp_path / "synth", num_images=10, seed=0)
    coco = load_coco_json(annotations)
    shutil.copy(images / coco["images"][2]["file_name"], images / "copy_of_3.jpg")
    coco["images"].append(dict(coco["images"][2], id=100, file_name="copy_of_3.jpg"))
    coco["annotations"].append({"id": 900, "image_id": 100, "category_id": 1, "bbox": [1, 1, 10, 10],
                                "iscrowd": 0, "area": 100})
    write_coco_json(annotations, coco)
    # The test input holds a copy of image 5: the test input's copy is kept although its id is higher.
    test_dir = tmp_path / "test_images"
    test_dir.mkdir()
    shutil.copy(images / coco["images"][4]["file_name"], test_dir / "five.jpg")
    test_annotations = write_coco_json(tmp_path / "test.json", {
        "images": [dict(coco["images"][4], id=500, file_name="five.jpg")],
        "categories": coco["categories"]})
    out = tmp_path / "out"
    manifest = shard_ok(out, spec(annotations, images), test_input=spec(test_annotations, test_dir),
                        splits="train=0.5,val=0.5")
    report = read_report(out)
    check_balanced(report)
    duplicates = {(d["kept"], d["rejected"]) for d in report["duplicates"]}
    assert duplicates == {(3, 100), (500, 5)}
    rejected = {e["image_id"]: e["reason"] for e in report["events"] if e["kind"] == "image_rejected"}
    assert rejected == {100: "duplicate_content", 5: "duplicate_content"}
    dropped = [e for e in report["events"] if e["kind"] == "annotation_dropped"]
    assert {e["annotation_id"] for e in dropped if e["reason"] == "image_rejected"} == {900} | {
        a["id"] for a in coco["annotations"] if a["image_id"] == 5}
    written = [i for split in manifest["splits"].values() for i in split["image_ids"]]
    assert sorted(written) == sorted({image["id"] for image in coco["images"]} - {100, 5} | {500})
    assert manifest["splits"]["test"]["image_ids"] == [500]


def test_repeated_image_id_in_a_later_input_is_rejected(tmp_path):
    annotations, images = synth_set(tmp_path / "synth", num_images=6)
    other_images = tmp_path / "other"
    other_images.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(other_images / "a.jpg")
    other = write_coco_json(tmp_path / "other.json", {
        "images": [{"id": 2, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5]}],
        "categories": [{"id": 1, "name": "bottle"}]})
    out = tmp_path / "out"
    manifest = shard_ok(out, spec(annotations, images), spec(other, other_images), splits="train=1.0")
    report = read_report(out)
    check_balanced(report)
    assert report["images"]["rejected_by_reason"] == {"duplicate_image_id": 1}
    assert report["annotations"]["dropped_by_reason"] == {"image_rejected": 1}
    event = next(e for e in report["events"] if e["reason"] == "duplicate_image_id")
    assert (event["image_id"], event["source"], event["file"]) == (2, "other.json", "a.jpg")
    sample = next(meta for _, _, meta in read_split(out / "manifest.json", "train") if meta["image_id"] == 2)
    assert sample["source"] == "instances.json"
    assert sorted(manifest["splits"]["train"]["image_ids"]) == [1, 2, 3, 4, 5, 6]


def test_drop_empty_train_rejects_empty_images_from_train_only(tmp_path):
    annotations, images = synth_set(tmp_path / "synth", num_images=30)
    coco = load_coco_json(annotations)
    empty = {image["id"] for image in coco["images"][::2]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in empty]
    write_coco_json(annotations, coco)
    kept = shard_ok(tmp_path / "kept", spec(annotations, images), splits="train=0.5,val=0.5")
    dropped = shard_ok(tmp_path / "dropped", spec(annotations, images), splits="train=0.5,val=0.5",
                       drop_empty_train=True)
    train_empty = empty & set(kept["splits"]["train"]["image_ids"])
    assert train_empty and empty & set(kept["splits"]["val"]["image_ids"])
    assert dropped["splits"]["val"] == kept["splits"]["val"]
    assert set(dropped["splits"]["train"]["image_ids"]) == set(kept["splits"]["train"]["image_ids"]) - train_empty
    report = read_report(tmp_path / "dropped")
    check_balanced(report)
    assert report["images"]["rejected_by_reason"] == {"empty_train_image": len(train_empty)}
    assert all(meta["annotations"] for _, _, meta in read_split(tmp_path / "dropped" / "manifest.json", "train"))
    assert any(not meta["annotations"] for _, _, meta in read_split(tmp_path / "kept" / "manifest.json", "val"))


def test_shard_max_bytes_starts_new_shards(tmp_path):
    annotations, images = synth_set(tmp_path / "synth", num_images=20)
    manifest = shard_ok(tmp_path / "out", spec(annotations, images), splits="train=1.0", shard_max_bytes="20KB")
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2
    assert all(s["bytes"] <= 20_000 for s in shards)
    assert all((tmp_path / "out" / s["file"]).stat().st_size == s["bytes"] for s in shards)
    assert sum(s["num_samples"] for s in shards) == 20


def test_categories_map_sparse_ids_to_contiguous_labels_across_inputs(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image_dir / "a.jpg")
    Image.new("RGB", (32, 32), (200, 2, 3)).save(image_dir / "b.jpg")
    first = write_coco_json(tmp_path / "first.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 90, "bbox": [1, 2, 3, 4]}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"}]})
    second = write_coco_json(tmp_path / "second.json", {
        "images": [{"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 12, "bbox": [1, 2, 3, 4]}],
        "categories": [{"id": 12, "name": "street sign"}, {"id": 5, "name": "airplane"}]})
    out = tmp_path / "out"
    manifest = shard_ok(out, spec(first, image_dir), spec(second, image_dir), splits="train=1.0")
    assert manifest["categories"] == [{"label": 1, "category_id": 5, "name": "airplane"},
                                      {"label": 2, "category_id": 12, "name": "street sign"},
                                      {"label": 3, "category_id": 90, "name": "toothbrush"}]
    labels = {meta["image_id"]: meta["annotations"][0]["label"] for _, _, meta in read_split(
        out / "manifest.json", "train")}
    assert labels == {1: 3, 2: 2}
    # Sizes left out of the annotation file are taken from the image; a missing area comes from the box.
    report = read_report(out)
    assert report["annotations"]["fixed_by_reason"] == {"area_from_box": 2}
    assert report["images"]["fixed_by_reason"] == {"size_filled_from_file": 2}


class RecordingList(list):
    """A list that counts how far it has been iterated: how far the pool has read ahead."""

    fed = 0

    def __iter__(self):
        for self.fed, item in enumerate(super().__iter__(), start=1):
            yield item


def test_parallel_map_reads_ahead_only_a_few_chunks():
    items = RecordingList(range(500))
    with Workers(2) as workers:
        results = workers.ordered_map(abs, items, chunksize=2)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        time.sleep(0.3)  # unbounded, Pool.imap would have taken all 500 items by now
        fed = items.fed
        results.close()  # a consumer that stops early: its feed ends, so the pool can run the next map
        assert list(workers.ordered_map(abs, list(range(-50, 0)), chunksize=3)) == list(range(50, 0, -1))
    assert 3 < fed <= 2 * 2 * PENDING_CHUNKS_PER_WORKER + 3 + 1  # the limit, the 3 consumed, 1 waiting


def test_an_error_in_the_consumer_does_not_hang_the_pool():
    def consume():
        with Workers(2) as workers:
            for value in workers.ordered_map(abs, list(range(1000)), chunksize=2):
                if value == 5:
                    raise KeyError("disk full")

    with pytest.raises(KeyError, match="disk full"):
        consume()
