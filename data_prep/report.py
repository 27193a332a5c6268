"""report.json: every image and annotation that was fixed, rejected or dropped, with its reason.

Counts are kept next to the events that justify them, and the totals must balance
(in = written + rejected for images, in = written + dropped for annotations) before anything is written.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from common.atomic_io import write_json_atomically
from data_prep.coco_input import AnnotationRecord, ImageRecord


class Report:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.duplicates: list[dict] = []
        self.images_written = 0
        self.annotations_written = 0
        self.images_rejected: Counter[str] = Counter()
        self.images_fixed: Counter[str] = Counter()
        self.annotations_dropped: Counter[str] = Counter()
        self.annotations_fixed: Counter[str] = Counter()

    def _image_event(self, kind: str, image: ImageRecord, reason: str, detail: str) -> None:
        self.events.append({"kind": kind, "reason": reason, "image_id": image.image_id,
                            "file": image.file_name, "source": image.source, "detail": detail})

    def _annotation_event(self, kind: str, annotation: AnnotationRecord, reason: str, detail: str) -> None:
        self.events.append({"kind": kind, "reason": reason, "annotation_id": annotation.annotation_id,
                            "image_id": annotation.image_id, "source": annotation.source, "detail": detail})

    def reject_image(self, image: ImageRecord, reason: str, detail: str = "") -> None:
        self.images_rejected[reason] += 1
        self._image_event("image_rejected", image, reason, detail)

    def fix_image(self, image: ImageRecord, reason: str, detail: str = "") -> None:
        self.images_fixed[reason] += 1
        self._image_event("image_fixed", image, reason, detail)

    def drop_annotation(self, annotation: AnnotationRecord, reason: str, detail: str = "") -> None:
        self.annotations_dropped[reason] += 1
        self._annotation_event("annotation_dropped", annotation, reason, detail)

    def fix_annotation(self, annotation: AnnotationRecord, reason: str, detail: str = "") -> None:
        self.annotations_fixed[reason] += 1
        self._annotation_event("annotation_fixed", annotation, reason, detail)

    def add_duplicate(self, kept: ImageRecord, rejected: ImageRecord, sha256: str) -> None:
        self.duplicates.append({"kept": kept.image_id, "rejected": rejected.image_id, "sha256": sha256,
                                "kept_source": kept.source, "rejected_source": rejected.source})

    def count_written(self, num_annotations: int) -> None:
        self.images_written += 1
        self.annotations_written += num_annotations

    def to_dict(self, *, images_in: int, annotations_in: int, selection: dict) -> dict:
        """The report; RuntimeError if the totals do not balance (a bug: something went unaccounted)."""
        images_rejected = sum(self.images_rejected.values())
        annotations_dropped = sum(self.annotations_dropped.values())
        if images_in != self.images_written + images_rejected:
            raise RuntimeError(f"images in {images_in} != written {self.images_written} + rejected {images_rejected}")
        if annotations_in != self.annotations_written + annotations_dropped:
            raise RuntimeError(
                f"annotations in {annotations_in} != written {self.annotations_written} + dropped {annotations_dropped}"
            )
        return {
            "images": {"in": images_in, "written": self.images_written, "rejected": images_rejected,
                       "rejected_by_reason": dict(sorted(self.images_rejected.items())),
                       "fixed_by_reason": dict(sorted(self.images_fixed.items()))},
            "annotations": {"in": annotations_in, "written": self.annotations_written,
                            "dropped": annotations_dropped,
                            "dropped_by_reason": dict(sorted(self.annotations_dropped.items())),
                            "fixed_by_reason": dict(sorted(self.annotations_fixed.items()))},
            "selection": selection,
            "duplicates": self.duplicates,
            "events": self.events,
        }


def write_report(path: Path, report: dict) -> None:
    write_json_atomically(path, report, indent=1)


def format_report_table(report: dict) -> str:
    """A short table: the totals and a line per reason."""
    lines = []
    for kind, removed in (("images", "rejected"), ("annotations", "dropped")):
        counts = report[kind]
        lines.append(f"{kind:<12} in {counts['in']:>8}  written {counts['written']:>8}  "
                     f"{removed} {counts[removed]:>8}")
        for label, by_reason in ((removed, counts[f"{removed}_by_reason"]), ("fixed", counts["fixed_by_reason"])):
            lines.extend(f"  {label:<9} {reason:<24} {count:>8}" for reason, count in by_reason.items())
    selection = report["selection"]
    for cause in ("subsample", "split_counts"):
        if count := selection[f"images_not_drawn_by_{cause}"]:
            lines.append(f"not drawn    {count} of {selection['images_read']} images (by {cause.replace('_', ' ')})")
    return "\n".join(lines)


def format_split_table(rows: list[tuple[str, int, int, int]]) -> str:
    """rows: (split, images, annotations, shards)."""
    lines = [f"{'split':<12} {'images':>8} {'annotations':>12} {'shards':>7}"]
    lines.extend(f"{split:<12} {images:>8} {annotations:>12} {shards:>7}"
                 for split, images, annotations, shards in rows)
    return "\n".join(lines)
