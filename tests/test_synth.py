"""The synthetic product set: deterministic, valid COCO, tight boxes inside the image, its command line."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from common.colour_palette import COLOUR_NAMES
from data_prep.synth import CATEGORIES, write_synthetic_coco

REPO_ROOT = Path(__file__).resolve().parents[1]


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """40 small images: enough to see every class, overlaps and border cuts."""
    return write_synthetic_coco(tmp_path_factory.mktemp("synth"), num_images=40, image_size=96, seed=0)


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path, dataset):
    again = write_synthetic_coco(tmp_path / "again", num_images=40, image_size=96, seed=0, num_workers=2)
    first, second = _all_bytes(dataset.parent.parent), _all_bytes(again.parent.parent)
    assert len(first) == 41  # 40 images and the annotations
    assert first == second


def test_different_seed_gives_different_images_and_boxes(tmp_path, dataset):
    other = write_synthetic_coco(tmp_path / "other", num_images=40, image_size=96, seed=1)
    assert other.read_bytes() != dataset.read_bytes()
    first, second = _all_bytes(dataset.parent.parent), _all_bytes(other.parent.parent)
    assert sum(first[name] != second[name] for name in first if name.startswith("images/")) == 40


def test_pycocotools_loads_it_and_images_match_their_records(dataset):
    coco = COCO(str(dataset))
    assert sorted(coco.getImgIds()) == list(range(1, 41))
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        assert info["file_name"] == f"{image_id:06d}.jpg"
        with Image.open(dataset.parent.parent / "images" / info["file_name"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (info["width"], info["height"])
    annotation_ids = coco.getAnnIds()
    assert sorted(annotation_ids) == list(range(1, len(annotation_ids) + 1))


def test_every_box_lies_inside_its_image_with_positive_area(dataset):
    coco = json.loads(dataset.read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        width, height = sizes[annotation["image_id"]]
        assert w > 0 and h > 0, annotation
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, annotation
        assert annotation["area"] == w * h and annotation["iscrowd"] == 0


def test_sparse_category_ids_are_all_used_and_images_are_crowded(dataset):
    coco = json.loads(dataset.read_text())
    assert coco["categories"] == CATEGORIES
    ids = [c["id"] for c in coco["categories"]]
    assert ids != list(range(1, len(ids) + 1)), "ids must be sparse to exercise the label mapping"
    assert {c["name"] for c in coco["categories"]} == {"bottle", "box", "can", "shoe", "bag"}
    used = Counter(a["category_id"] for a in coco["annotations"])
    assert set(used) == set(ids)
    assert len(coco["annotations"]) / len(coco["images"]) >= 2.5
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert max(per_image.values()) >= 5
    shapes = {(image["width"], image["height"]) for image in coco["images"]}
    assert len(shapes) > 5, "image shapes should vary"


def _boxes_overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_boxes_are_tight_around_the_drawn_objects(dataset):
    """At each side of an isolated box, the object's edge lies between the row inside the box and outside it.

    A box loose by a pixel or more, or cutting into its object, has no such contrast on most sides.
    """
    coco = json.loads(dataset.read_text())
    images = {image["id"]: image for image in coco["images"]}
    by_image: dict[int, list] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    sides_checked = sides_with_edge = 0
    for image_id, boxes in by_image.items():
        info = images[image_id]
        with Image.open(dataset.parent.parent / "images" / info["file_name"]) as image:
            pixels = np.asarray(image, dtype=np.int16)
        for box in boxes:
            if any(other is not box and _boxes_overlap(box, other) for other in boxes):
                continue
            x, y, w, h = box
            if x < 1 or y < 1 or x + w >= info["width"] or y + h >= info["height"]:
                continue
            inside_outside = [
                (pixels[y:y + h, x], pixels[y:y + h, x - 1]),
                (pixels[y:y + h, x + w - 1], pixels[y:y + h, x + w]),
                (pixels[y, x:x + w], pixels[y - 1, x:x + w]),
                (pixels[y + h - 1, x:x + w], pixels[y + h, x:x + w]),
            ]
            for inside, outside in inside_outside:
                sides_checked += 1
                sides_with_edge += int(np.abs(inside - outside).sum(axis=-1).max() >= 60)
    assert sides_checked >= 40
    assert sides_with_edge / sides_checked >= 0.9


def test_refuses_to_mix_with_an_earlier_run_unless_overwrite(tmp_path):
    write_synthetic_coco(tmp_path, num_images=5, image_size=64, seed=0)
    with pytest.raises(FileExistsError, match="images"):
        write_synthetic_coco(tmp_path, num_images=3, image_size=64, seed=0)
    write_synthetic_coco(tmp_path, num_images=3, image_size=64, seed=0, overwrite=True)
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert images == ["000001.jpg", "000002.jpg", "000003.jpg"]


def test_command_line_writes_the_set_and_prints_a_summary(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "data_prep", "synth", "--out", str(out), "--num-images", "6",
               "--image-size", "64", "--seed", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    coco = json.loads((out / "annotations" / "instances.json").read_text())
    assert len(coco["images"]) == 6 and len(list((out / "images").glob("*.jpg"))) == 6
    summary = result.stdout.strip().splitlines()[-1]
    assert f"6 images, {len(coco['annotations'])} annotations" in summary and str(out) in summary
    for name in ("bottle", "box", "can", "shoe", "bag"):
        assert name in summary

    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_every_product_records_its_main_colour_from_the_palette(dataset):
    coco = json.loads(dataset.read_text())
    colours = Counter(annotation["attributes"]["colour"] for annotation in coco["annotations"])
    assert set(colours) == set(COLOUR_NAMES)  # 40 images show all twelve
    assert all(set(annotation["attributes"]) == {"colour"} for annotation in coco["annotations"])
