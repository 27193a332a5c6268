"""Malformed annotation files, the output directory's safety rules, and the manifest loader's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_shard import read_report, run_shard, shard_ok, write_coco_json

from data_prep.coco_input import InputSpec
from data_prep.manifest import load_manifest, shard_paths
from data_prep.shard_writer import ShardWriter

GOOD = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24},
               {"id": 2, "file_name": "b.jpg", "width": 32, "height": 24}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}],
    "categories": [{"id": 1, "name": "bottle"}],
}


@pytest.fixture
def image_dir(tmp_path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(directory / "a.jpg")
    Image.new("RGB", (32, 24), (10, 10, 200)).save(directory / "b.jpg")
    return directory


def with_changes(**changes) -> dict:
    return json.loads(json.dumps(GOOD)) | changes


@pytest.mark.parametrize("document, expected", [
    ({"annotations": [], "categories": []}, "missing 'images'"),
    (with_changes(images={"id": 1}), "'images' must be a list"),
    (with_changes(images=[{"file_name": "a.jpg"}]), "images[0].id missing"),
    (with_changes(images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2}]), "images[1].file_name missing"),
    (with_changes(images=[{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]),
     "images[1].id 1 repeats images[0].id"),
    (with_changes(images=[{"id": 1, "file_name": "a.jpg", "width": "wide", "height": 24}]),
     "images[0].width must be a positive integer"),
    (with_changes(images=["a.jpg"]), "images[0] must be an object"),
    (with_changes(annotations=[{"image_id": 1, "bbox": [1, 1, 2, 2]}]), "annotations[0].id missing"),
    (with_changes(categories=[{"id": 1}]), "categories[0].name missing"),
    (with_changes(categories=[{"name": "bottle"}]), "categories[0].id missing"),
    (with_changes(categories=[{"id": 1, "name": "bottle"}, {"id": 1, "name": "can"}]),
     "category id 1 is named both 'bottle' and 'can'"),
    ([1, 2], "top level must be a JSON object"),
])
def test_malformed_annotation_file_names_the_file_and_field(tmp_path, image_dir, capsys, document, expected):
    annotations = write_coco_json(tmp_path / "labels.json", document)
    assert run_shard("--input", f"{annotations}:{image_dir}", "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert str(annotations) in error and expected in error
    assert not (tmp_path / "out").exists()


def test_json_syntax_error_gives_line_and_column(tmp_path, image_dir, capsys):
    annotations = tmp_path / "labels.json"
    annotations.write_text('{\n  "images": [\n    {"id": 1, "file_name": "a.jpg",}\n  ]\n}\n')
    assert run_shard("--input", f"{annotations}:{image_dir}", "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert f"{annotations}: invalid JSON at line 3, column 36" in error


@pytest.mark.parametrize("problem", ["missing file", "missing image dir"])
def test_unreadable_input_is_a_clear_error(tmp_path, image_dir, capsys, problem):
    annotations = write_coco_json(tmp_path / "labels.json", GOOD)
    if problem == "missing file":
        annotations = tmp_path / "nothing.json"
    else:
        image_dir = tmp_path / "no_images"
    assert run_shard("--input", f"{annotations}:{image_dir}", "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert str(annotations) in error and ("cannot read" in error or str(image_dir) in error)


def test_same_category_id_with_two_names_across_inputs_is_an_error(tmp_path, image_dir, capsys):
    first = write_coco_json(tmp_path / "first.json", GOOD)
    second = write_coco_json(tmp_path / "second.json", with_changes(
        images=[{"id": 7, "file_name": "b.jpg"}], annotations=[], categories=[{"id": 1, "name": "can"}]))
    assert run_shard("--input", f"{first}:{image_dir}", "--input", f"{second}:{image_dir}",
                     "--out", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert str(second) in error and "id 1 is 'can' here but 'bottle' in" in error and str(first) in error


def test_input_spec_keeps_colons_in_paths():
    assert InputSpec.parse("C:/data/labels.json:C:/data/images") == InputSpec(
        Path("C:/data/labels.json"), Path("C:/data/images"))
    assert InputSpec.parse("labels:images") == InputSpec(Path("labels"), Path("images"))
    with pytest.raises(ValueError, match="ANNOTATIONS.json:IMAGE_DIR"):
        InputSpec.parse("labels.json")


def test_refuses_a_foreign_non_empty_directory_unless_overwrite(tmp_path, image_dir, capsys):
    annotations = write_coco_json(tmp_path / "labels.json", GOOD)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    arguments = ["--input", f"{annotations}:{image_dir}", "--out", str(out), "--splits", "train=1.0"]
    assert run_shard(*arguments) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert run_shard(*arguments, "--overwrite") == 0
    assert (out / "thesis.tex").read_text() == "precious"
    assert (out / "manifest.json").exists()


def test_rerun_replaces_a_previous_output_and_its_stale_shards(tmp_path, image_dir):
    annotations = write_coco_json(tmp_path / "labels.json", GOOD)
    out = tmp_path / "out"
    first = shard_ok(out, f"{annotations}:{image_dir}", splits="train=1.0", shard_max_count=1)
    assert [s["file"] for s in first["splits"]["train"]["shards"]] == ["train-00000.tar", "train-00001.tar"]
    (out / ".train-00001.tar.k2x9q0ab.tmp").write_bytes(b"left by a killed run")
    second = shard_ok(out, f"{annotations}:{image_dir}", splits="train=1.0", shard_max_count=10)
    assert [s["file"] for s in second["splits"]["train"]["shards"]] == ["train-00000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "report.json", "train-00000.tar"]
    assert read_report(out)["images"]["written"] == 2


def test_a_failed_shard_leaves_no_temporary_file(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train", max_count=10, max_bytes=10**6) as writer:
        writer.write("000000000001", [("jpg", b"x" * 1000), ("json", b"{}")])
        raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []


def test_load_manifest_checks_version_and_keys(tmp_path, image_dir):
    annotations = write_coco_json(tmp_path / "labels.json", GOOD)
    out = tmp_path / "out"
    manifest = shard_ok(out, f"{annotations}:{image_dir}", splits="train=1.0")
    assert shard_paths(out / "manifest.json", "train") == [out / "train-00000.tar"]
    with pytest.raises(ValueError, match="no split 'val'"):
        shard_paths(out / "manifest.json", "val")

    broken = tmp_path / "broken.json"
    for change, message in [
        (lambda m: m.pop("categories"), "missing key 'categories'"),
        (lambda m: m["splits"]["train"].pop("image_ids"), "missing key 'splits.train.image_ids'"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), r"missing key 'splits.train.shards\[0\].sha256'"),
        (lambda m: m.update(format_version=2), "format_version 2 is not supported"),
    ]:
        copy = json.loads(json.dumps(manifest))
        change(copy)
        broken.write_text(json.dumps(copy))
        with pytest.raises(ValueError, match=f"{broken}: {message}"):
            load_manifest(broken)
    broken.write_text('{"format_version": 1,')
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        load_manifest(broken)
