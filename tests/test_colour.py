"""extract/colour.py: palette names in CIELAB, the object told from its background on hand-made crops, and
the names synth recorded found again on the ground-truth boxes of a small synthetic set."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from torchvision.io import read_image

from common.colour_palette import COLOUR_NAMES, PALETTE
from data_prep.synth import write_synthetic_coco
from extract.colour import add_colours, dominant_colours, name_colours, srgb_to_lab
from extract.database import Detection, DetectionAttribute

RED, BLUE, WHITE = (200, 20, 30), (20, 40, 200), (250, 250, 250)


def canvas(height: int, width: int, colour: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8)[:, None, None].repeat(1, height, width)


def paint(image: torch.Tensor, rows: slice, cols: slice, colour: tuple[int, int, int]) -> None:
    image[:, rows, cols] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]


def names(image: torch.Tensor, boxes: list[list[float]]) -> list[tuple[str, float]]:
    return [(c.name, c.share) for c in dominant_colours(image, torch.tensor(boxes, dtype=torch.float32))]


def test_lab_of_white_and_palette_anchors_are_named_by_their_own_name():
    assert srgb_to_lab(torch.tensor([1.0, 1.0, 1.0])).tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    anchors = [(name, anchor) for name in COLOUR_NAMES for anchor in PALETTE[name]]
    lab = srgb_to_lab(torch.tensor([anchor for _, anchor in anchors], dtype=torch.float32) / 255)
    assert [COLOUR_NAMES[i] for i in name_colours(lab).tolist()] == [name for name, _ in anchors]
    # colours people name without hesitation, none of them an anchor
    plain = {"red": (220, 20, 60), "orange": (255, 140, 0), "yellow": (255, 215, 0), "green": (34, 139, 34),
             "blue": (65, 105, 225), "purple": (148, 0, 211), "pink": (255, 182, 193), "brown": (120, 70, 30),
             "white": (248, 248, 255), "grey": (105, 105, 105), "black": (10, 10, 10), "cyan": (64, 224, 208)}
    lab = srgb_to_lab(torch.tensor(list(plain.values()), dtype=torch.float32) / 255)
    assert [COLOUR_NAMES[i] for i in name_colours(lab).tolist()] == list(plain)


def test_a_red_square_on_white_is_red_and_the_white_is_background():
    image = canvas(100, 100, WHITE)
    paint(image, slice(30, 70), slice(20, 80), RED)
    # a loose box, a tighter one, and one exactly on the square (nothing is background then)
    results = names(image, [[0, 0, 100, 100], [10, 20, 90, 80], [20, 30, 80, 70]])
    for name, share in results:
        assert name == "red" and share == pytest.approx(1.0, abs=0.02)


def test_share_is_the_dominant_colours_fraction_of_the_object():
    image = canvas(120, 120, WHITE)
    paint(image, slice(20, 100), slice(30, 90), RED)  # an object of 80 x 60 ...
    paint(image, slice(60, 80), slice(30, 90), BLUE)  # ... with a blue band over a quarter of it
    # shares are counted on the box's lattice (GRID points a side): this box puts lattice rows 10 px apart,
    # so the object's edges and the band's fall between rows and the counts are exact
    [(name, share)] = names(image, [[0, 0, 120, 120]])
    assert name == "red" and share == pytest.approx(0.75, abs=0.01)
    paint(image, slice(20, 60), slice(30, 90), BLUE)  # now three quarters blue
    [(name, share)] = names(image, [[0, 0, 120, 120]])
    assert name == "blue" and share == pytest.approx(0.75, abs=0.01)
    # any other box: within about one lattice row of the object
    [(name, share)] = names(image, [[7, 13, 111, 109]])
    assert name == "blue" and share == pytest.approx(0.75, abs=0.1)


def test_a_shaded_object_on_a_textured_background_keeps_its_name():
    generator = torch.Generator().manual_seed(0)
    background = (torch.rand(3, 90, 90, generator=generator) * 60 + 40).to(torch.uint8)  # dark grey noise
    shade = torch.linspace(0.65, 1.15, 40)[None, None, :]  # lit from the right
    red = torch.tensor(RED, dtype=torch.float32)[:, None, None]
    background[:, 25:65, 25:65] = (red * shade).clamp(0, 255).to(torch.uint8)
    assert names(background, [[15, 15, 75, 75]])[0][0] == "red"


def test_add_colours_appends_one_colour_attribute_per_detection():
    image = canvas(60, 60, WHITE)
    paint(image, slice(10, 30), slice(10, 30), RED)
    paint(image, slice(35, 55), slice(35, 55), BLUE)
    detections = [Detection("can", 4, 0.9, (5.0, 5.0, 35.0, 35.0)), Detection("box", 3, 0.8, (30.0, 30.0, 60.0, 60.0))]
    coloured = add_colours(image, detections)
    assert [(d.name, d.attributes[0].kind, d.attributes[0].value) for d in coloured] == [
        ("can", "colour", "red"), ("box", "colour", "blue")]
    assert all(isinstance(d.attributes[0], DetectionAttribute) for d in coloured)
    assert add_colours(image, []) == []


def test_recorded_colours_are_found_on_the_ground_truth_boxes_of_a_synthetic_set(tmp_path):
    annotations = write_synthetic_coco(tmp_path, num_images=40, image_size=256, seed=3)
    coco = json.loads(annotations.read_text())
    per_image = defaultdict(list)
    for annotation in coco["annotations"]:
        per_image[annotation["image_id"]].append(annotation)
    right = total = 0
    for image in coco["images"]:
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in per_image[image["id"]])]
        found = names(read_image(str(tmp_path / "images" / image["file_name"])), boxes) if boxes else []
        for annotation, (name, _) in zip(per_image[image["id"]], found, strict=True):
            right += annotation["attributes"]["colour"] == name
            total += 1
    assert total > 100 and right / total >= 0.9, f"{right} of {total}"
