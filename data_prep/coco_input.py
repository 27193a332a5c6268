"""Read and validate COCO-format annotation files, and turn their boxes into shard annotations.

A problem with the file itself (unreadable, not JSON, a missing or mistyped required field, a category id
with two names) is an `AnnotationFileError` naming the file and the field. A problem with one annotation
(a bad box, an unknown category or image) is not an error: the caller drops it with a reason, so one bad
record never stops a 100k-image run and none disappears silently.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class AnnotationFileError(ValueError):
    """An annotation file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class InputSpec:
    annotations: Path
    images: Path
    is_test: bool = False

    @classmethod
    def parse(cls, text: str, *, is_test: bool = False) -> InputSpec:
        """`ANNOTATIONS.json:IMAGE_DIR`; split after `.json:` when present so other colons survive."""
        annotations, sep, images = text.partition(".json:")
        if sep:
            annotations += ".json"
        else:
            annotations, sep, images = text.rpartition(":")
        if not sep or not annotations or not images:
            raise ValueError(f"input '{text}' is not ANNOTATIONS.json:IMAGE_DIR")
        return cls(Path(annotations), Path(images), is_test)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    image_id: int
    file_name: str
    path: Path
    width: int | None  # as annotated; None when the file does not say
    height: int | None
    source: str  # annotation file name, for events and the sample json
    input_index: int  # which input it came from: image ids may repeat across inputs (then rejected)


@dataclass(frozen=True, slots=True)
class AnnotationRecord:
    """The fields of one COCO annotation the shards need (segmentations are not kept), values unchecked.

    `attributes` is the annotation's optional `attributes` object (e.g. {"colour": "red"}, as attribute data
    sets such as Fashionpedia carry them), None when absent; it travels to the shards as it is.
    """

    annotation_id: int
    image_id: object
    category_id: object
    bbox: object
    iscrowd: object
    area: object
    source: str
    input_index: int
    attributes: object = None


@dataclass
class CocoInput:
    spec: InputSpec
    sha256: str
    images: list[ImageRecord]
    annotations: list[AnnotationRecord]
    categories: dict[int, str]

    @property
    def source(self) -> str:
        return self.spec.annotations.name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> tuple[object, str]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise AnnotationFileError(f"{path}: cannot read annotation file: {error.strerror or error}") from error
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise AnnotationFileError(f"{path}: not UTF-8 text (byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise AnnotationFileError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    return document, hashlib.sha256(data).hexdigest()


def _list_field(path: Path, document: dict, key: str, *, required: bool) -> list:
    if key not in document:
        if required:
            raise AnnotationFileError(f"{path}: missing '{key}'")
        return []
    value = document[key]
    if not isinstance(value, list):
        raise AnnotationFileError(f"{path}: '{key}' must be a list, not {type(value).__name__}")
    return value


def _object_at(path: Path, field: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise AnnotationFileError(f"{path}: {field} must be an object, not {type(value).__name__}")
    return value


def _read_categories(path: Path, entries: list) -> dict[int, str]:
    categories: dict[int, str] = {}
    for index, entry in enumerate(entries):
        field = f"categories[{index}]"
        entry = _object_at(path, field, entry)
        if not _is_int(entry.get("id")):
            raise AnnotationFileError(f"{path}: {field}.id missing or not an integer")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise AnnotationFileError(f"{path}: {field}.name missing or not a non-empty string")
        category_id, name = entry["id"], entry["name"]
        if categories.get(category_id, name) != name:
            raise AnnotationFileError(
                f"{path}: {field}: category id {category_id} is named both '{categories[category_id]}' and '{name}'"
            )
        categories[category_id] = name
    return categories


def _optional_size(path: Path, field: str, value: object) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value <= 0:
        raise AnnotationFileError(f"{path}: {field} must be a positive integer, not {value!r}")
    return value


def _entries_with_unique_ids(path: Path, section: str, entries: list, non_negative: bool
                             ) -> Iterator[tuple[str, dict, int]]:
    """(field, entry, id) of each object in images[] or annotations[]; an id missing, invalid or repeated in the
    section is an error naming the file and both entries."""
    first_index_of_id: dict[int, int] = {}
    for index, entry in enumerate(entries):
        field = f"{section}[{index}]"
        entry = _object_at(path, field, entry)
        entry_id = entry.get("id")
        if not _is_int(entry_id) or (non_negative and entry_id < 0):
            expected = "a non-negative integer" if non_negative else "an integer"
            raise AnnotationFileError(f"{path}: {field}.id missing or not {expected}")
        if entry_id in first_index_of_id:
            raise AnnotationFileError(
                f"{path}: {field}.id {entry_id} repeats {section}[{first_index_of_id[entry_id]}].id"
            )
        first_index_of_id[entry_id] = index
        yield field, entry, entry_id


def _read_images(path: Path, entries: list, image_dir: Path, input_index: int) -> list[ImageRecord]:
    images: list[ImageRecord] = []
    for field, entry, image_id in _entries_with_unique_ids(path, "images", entries, non_negative=True):
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise AnnotationFileError(f"{path}: {field}.file_name missing or not a non-empty string")
        images.append(ImageRecord(
            image_id=image_id,
            file_name=file_name,
            path=image_dir / file_name,
            width=_optional_size(path, f"{field}.width", entry.get("width")),
            height=_optional_size(path, f"{field}.height", entry.get("height")),
            source=path.name,
            input_index=input_index,
        ))
    return images


def _read_annotations(path: Path, entries: list, input_index: int) -> list[AnnotationRecord]:
    annotations: list[AnnotationRecord] = []
    for _, entry, annotation_id in _entries_with_unique_ids(path, "annotations", entries, non_negative=False):
        annotations.append(AnnotationRecord(
            annotation_id=annotation_id,
            image_id=entry.get("image_id"),
            category_id=entry.get("category_id"),
            bbox=entry.get("bbox"),
            iscrowd=entry.get("iscrowd", 0),
            area=entry.get("area"),
            source=path.name,
            input_index=input_index,
            attributes=entry.get("attributes"),
        ))
    return annotations


def load_coco(spec: InputSpec, input_index: int) -> CocoInput:
    """Read one annotation file; `images` is required, `annotations` and `categories` may be absent."""
    path = spec.annotations
    if not spec.images.is_dir():
        raise AnnotationFileError(f"{path}: image directory {spec.images} does not exist")
    document, sha256 = _read_json(path)
    if not isinstance(document, dict):
        raise AnnotationFileError(f"{path}: top level must be a JSON object, not {type(document).__name__}")
    return CocoInput(
        spec=spec,
        sha256=sha256,
        images=_read_images(path, _list_field(path, document, "images", required=True), spec.images, input_index),
        annotations=_read_annotations(
            path, _list_field(path, document, "annotations", required=False), input_index
        ),
        categories=_read_categories(path, _list_field(path, document, "categories", required=False)),
    )


def annotation_problem(annotation: AnnotationRecord, known_categories: dict[int, str]) -> tuple[str, str] | None:
    """(reason, detail) when the annotation is unusable whatever its image, else None."""
    category_id = annotation.category_id
    if not _is_int(category_id) or category_id not in known_categories:
        return "unknown_category", f"category_id {category_id!r} is not in the file's categories"
    bbox = annotation.bbox
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "malformed_bbox", f"bbox {bbox!r} is not a list of 4 finite numbers"
    if annotation.iscrowd not in (0, 1):  # True/False compare equal to 1/0 and are accepted
        return "malformed_iscrowd", f"iscrowd {annotation.iscrowd!r} is not 0 or 1"
    return None


@dataclass(frozen=True)
class BoxOutcome:
    """A shard annotation, or the reason it was dropped; `fixes` are (reason, detail) applied to it."""

    annotation: dict | None
    dropped: tuple[str, str] | None
    fixes: tuple[tuple[str, str], ...]


def to_shard_annotation(annotation: AnnotationRecord, width: int, height: int, label: int) -> BoxOutcome:
    """COCO xywh -> xyxy clipped to the stored image; dropped when nothing of the box is left.

    Expects an annotation `annotation_problem` accepted.
    """
    x, y, w, h = (float(v) for v in annotation.bbox)
    x1, y1, x2, y2 = x, y, x + w, y + h
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return BoxOutcome(None, ("zero_area", f"bbox {annotation.bbox!r} in a {width}x{height} image"), ())
    fixes = []
    if clipped != (x1, y1, x2, y2):
        fixes.append(("clipped_to_image", f"xyxy {[x1, y1, x2, y2]} -> {list(clipped)} in {width}x{height}"))
    area = annotation.area
    if not _is_number(area) or area <= 0:
        area = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
        fixes.append(("area_from_box", f"area {annotation.area!r} -> box area {area}"))
    shard_annotation = {
        "id": annotation.annotation_id,
        "bbox": list(clipped),
        "label": label,
        "category_id": annotation.category_id,
        "iscrowd": int(annotation.iscrowd),
        "area": area,
    }
    if isinstance(annotation.attributes, dict):
        shard_annotation["attributes"] = annotation.attributes
    elif annotation.attributes is not None:
        fixes.append(("attributes_dropped", f"attributes {annotation.attributes!r} is not a JSON object"))
    return BoxOutcome(annotation=shard_annotation, dropped=None, fixes=tuple(fixes))
