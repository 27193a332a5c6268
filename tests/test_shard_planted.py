"""The planted-defects set: real photos with known image defects plus planted annotation defects.

Every image and every annotation must come out written, fixed, rejected or dropped exactly as planned,
each with its event in report.json, and the totals must balance.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from planted_images import PlantedImage, make_planted_images
from test_shard import check_balanced, read_report, read_split, run_shard, write_coco_json

CATEGORIES = [{"id": 3, "name": "bottle"}, {"id": 7, "name": "can"}]
LABEL = {3: 1, 7: 2}
EMPTY_IMAGE_FILE = "rgb.png"  # the one image planted without annotations


def annotation(annotation_id: int, image_id: int, bbox, category_id: int = 3, **extra) -> dict:
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


@dataclass(frozen=True)
class ImageExpectations:
    """What the shard must do with each planted image, keyed by image id."""

    ids: dict[str, int]  # file name -> image id
    images: list[dict]  # the COCO image records
    rejection: dict[int, str]  # image id -> rejection reason
    first_with_bytes: dict[str, int]  # sha256 of the content -> the lowest id holding it
    written: dict[int, PlantedImage]  # image id -> the planted image it must be stored as


@dataclass(frozen=True)
class AnnotationExpectations:
    """The planted annotations and, by annotation id, their expected drop reason, stored box and fixes."""

    annotations: list[dict]
    drop: dict[int, str]
    boxes: dict[int, list]
    fixes: dict[int, list[str]]


def image_records(planted: list[PlantedImage], ids: dict[str, int]) -> list[dict]:
    """The COCO image records; width and height only where the planted case states them."""
    images = []
    for p in planted:
        record = {"id": ids[p.file_name], "file_name": p.file_name}
        if p.width is not None:
            record.update(width=p.width, height=p.height)
        images.append(record)
    return images


def expected_image_outcomes(image_dir: Path, planted: list[PlantedImage]) -> ImageExpectations:
    """Identical bytes are one image (the lowest id); missing and empty files are never hashed."""
    ids = {p.file_name: index for index, p in enumerate(planted, start=1)}
    rejection: dict[int, str] = {}
    first_with_bytes: dict[str, int] = {}
    for p in planted:
        path = image_dir / p.file_name
        content = path.read_bytes() if path.exists() else b""
        digest = hashlib.sha256(content).hexdigest()
        if content and digest in first_with_bytes:
            rejection[ids[p.file_name]] = "duplicate_content"
            continue
        if content:
            first_with_bytes[digest] = ids[p.file_name]
        if p.rejected:
            rejection[ids[p.file_name]] = p.expected
    written = {ids[p.file_name]: p for p in planted if ids[p.file_name] not in rejection}
    return ImageExpectations(ids, image_records(planted, ids), rejection, first_with_bytes, written)


def planted_annotations(expected_images: ImageExpectations) -> AnnotationExpectations:
    """One inside box on every image but one (rgb.png stays without annotations), then the planted defects."""
    ids, written = expected_images.ids, expected_images.written
    empty_image = ids[EMPTY_IMAGE_FILE]
    annotations = [annotation(1000 + image_id, image_id, [2, 3, 10, 12]) for image_id in ids.values()
                   if image_id != empty_image]
    clean = ids["clean_baseline.jpg"]
    width, height = written[clean].stored_size
    annotations += [
        annotation(1, clean, [1, 2, 3]),
        annotation(2, clean, [1, 2, "3", 4]),
        annotation(3, clean, [1, 2, float("nan"), 4]),  # json writes NaN, which Python's json reads back
        annotation(4, clean, None),
        annotation(5, clean, [-5, -6, 20, 20]),
        annotation(6, clean, [width - 5, 10, 20, 10], category_id=7),
        annotation(7, clean, [5, 5, 0, 10]),
        annotation(8, clean, [width + 10, 5, 5, 5]),
        annotation(9, clean, [10, 10, -3, 5]),
        annotation(10, clean, [1, 1, 5, 5], category_id=99),
        annotation(11, 9999, [1, 1, 5, 5]),
        annotation(12, clean, [4, 4, 30, 20], iscrowd=1, area=321.5),
        annotation(13, clean, [4, 4, 30, 20], iscrowd=2),
        annotation(14, clean, [4, 4, 30, 20], area=-1),
    ]
    drop = {1: "malformed_bbox", 2: "malformed_bbox", 3: "malformed_bbox", 4: "malformed_bbox",
            7: "zero_area", 8: "zero_area", 9: "zero_area", 10: "unknown_category", 11: "unknown_image",
            13: "malformed_iscrowd"}
    drop.update({1000 + image_id: "image_rejected" for image_id in expected_images.rejection})
    boxes = {5: [0, 0, 15, 14], 6: [width - 5, 10, width, 20], 12: [4, 4, 34, 24], 14: [4, 4, 34, 24]}
    boxes.update({1000 + image_id: [2, 3, 12, 15] for image_id in written if image_id != empty_image})
    fixes = {5: ["clipped_to_image", "area_from_box"], 6: ["clipped_to_image", "area_from_box"],
             14: ["area_from_box"]}
    fixes.update({1000 + image_id: ["area_from_box"] for image_id in written if image_id != empty_image})
    return AnnotationExpectations(annotations, drop, boxes, fixes)


def reasons_by(events: list[dict], key: str) -> dict[int, list[str]]:
    """The reasons of `events` grouped by their `key` (image_id or annotation_id), in report order."""
    reasons = defaultdict(list)
    for event in events:
        reasons[event[key]].append(event["reason"])
    return dict(reasons)


def check_report(report: dict, stdout: str, image_dir: Path, planted: list[PlantedImage],
                 expected_images: ImageExpectations, expected_annotations: AnnotationExpectations) -> None:
    """Every image and annotation has its event in report.json, the totals balance and stdout names each reason."""
    expected_rejection, expected_drop = expected_images.rejection, expected_annotations.drop
    check_balanced(report)
    assert report["images"]["in"] == len(planted)
    assert report["annotations"]["in"] == len(expected_annotations.annotations)
    events = defaultdict(list)
    for event in report["events"]:
        events[event["kind"]].append(event)
    assert {e["image_id"]: e["reason"] for e in events["image_rejected"]} == expected_rejection
    assert len(events["image_rejected"]) == len(expected_rejection)
    assert reasons_by(events["image_fixed"], "image_id") == {
        i: list(p.expected_fixes) for i, p in expected_images.written.items() if p.expected_fixes}
    assert {e["annotation_id"]: e["reason"] for e in events["annotation_dropped"]} == expected_drop
    assert reasons_by(events["annotation_fixed"], "annotation_id") == expected_annotations.fixes
    first_with_bytes = expected_images.first_with_bytes
    assert {(d["kept"], d["rejected"]) for d in report["duplicates"]} == {
        (first_with_bytes[hashlib.sha256((image_dir / planted[i - 1].file_name).read_bytes()).hexdigest()], i)
        for i, reason in expected_rejection.items() if reason == "duplicate_content"}
    for reason in {*expected_rejection.values(), *expected_drop.values(), "clipped_to_image"}:
        assert reason in stdout


def check_samples(out: Path, image_dir: Path, expected_images: ImageExpectations,
                  expected_annotations: AnnotationExpectations) -> None:
    """Each written image is a baseline RGB JPEG of its expected size, carrying its expected boxes."""
    written = expected_images.written
    samples = {meta["image_id"]: (jpg, meta) for _, jpg, meta in read_split(out / "manifest.json", "all")}
    assert set(samples) == set(written)
    for image_id, (jpg, meta) in samples.items():
        planted_image = written[image_id]
        assert (meta["width"], meta["height"]) == planted_image.stored_size
        with Image.open(io.BytesIO(jpg)) as stored:
            assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", planted_image.stored_size)
        if planted_image.expected == "ok":
            assert jpg == (image_dir / planted_image.file_name).read_bytes()
    boxes = {a["id"]: a for _, meta in samples.values() for a in meta["annotations"]}
    assert {i: a["bbox"] for i, a in boxes.items()} == expected_annotations.boxes
    assert samples[expected_images.ids[EMPTY_IMAGE_FILE]][1]["annotations"] == []
    assert (boxes[12]["iscrowd"], boxes[12]["area"]) == (1, 321.5)
    assert (boxes[6]["label"], boxes[6]["category_id"]) == (LABEL[7], 7)
    assert boxes[5]["area"] == 15 * 14
    assert all(a["iscrowd"] == 0 for i, a in boxes.items() if i != 12)


def test_planted_defects_are_all_accounted_for(tmp_path, capsys):
    image_dir = tmp_path / "images"
    planted = make_planted_images(image_dir)
    expected_images = expected_image_outcomes(image_dir, planted)
    assert "duplicate_content" in expected_images.rejection.values() and len(expected_images.written) >= 8
    expected_annotations = planted_annotations(expected_images)

    annotation_file = write_coco_json(tmp_path / "planted.json", {
        "images": expected_images.images, "annotations": expected_annotations.annotations,
        "categories": CATEGORIES})
    out = tmp_path / "out"
    assert run_shard("--input", f"{annotation_file}:{image_dir}", "--out", str(out), "--splits", "all=1.0",
                     "--num-workers", "2") == 0
    stdout = capsys.readouterr().out

    check_report(read_report(out), stdout, image_dir, planted, expected_images, expected_annotations)
    check_samples(out, image_dir, expected_images, expected_annotations)
    json.loads((out / "manifest.json").read_text())
