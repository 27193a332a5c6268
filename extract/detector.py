"""A trained checkpoint as a detector ready for inference: built as it was trained, loaded strictly, with the
score threshold and the per-image cap (by default the one it was tested with) applied inside the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from data_prep.class_list import ClassList
from train.checkpoint import checkpoint_classes, load_model_checkpoint
from train.evaluate import per_class_metrics
from train.model import model_from_checkpoint, set_max_detections, trained_max_detections


@dataclass
class Detector:
    model: nn.Module
    architecture: str
    classes: ClassList  # what the model's labels mean
    test_map: float | None
    test_ap_per_class: dict[str, dict[str, float]]  # {} when the checkpoint records none
    max_detections: int  # per image


def load_detector(path: Path, score_threshold: float, max_detections: int | None = None) -> Detector:
    """The checkpoint's model, built as it was trained (name, sizes, BatchNorm kind) and loaded strictly; at most
    `max_detections` per image, by default as many as it was trained and tested with (its eval.max_detections)."""
    state = load_model_checkpoint(path)
    model, model_cfg = model_from_checkpoint(state, path)
    if max_detections is None:
        max_detections = trained_max_detections(state)
    limit_detections(model, score_threshold, max_detections)
    test_ap_per_class = per_class_metrics(state.get("test_metrics") or {})
    classes = checkpoint_classes(state, path)
    return Detector(model.eval(), model_cfg.name, classes, stored_test_map(state), test_ap_per_class,
                    max_detections)


def stored_test_map(state: dict) -> float | None:
    """The test-split COCO AP the checkpoint records (state["test_metrics"]["AP"]); None when it records none or
    the AP is undefined there (NaN): the database then says "unknown"."""
    value = (state.get("test_metrics") or {}).get("AP")
    return None if value is None or value != value else float(value)  # NaN: undefined on that split


def limit_detections(model: nn.Module, score_threshold: float, max_detections: int) -> None:
    """Apply the threshold and the per-image cap inside the model (Faster R-CNN keeps them on roi_heads,
    RetinaNet/FCOS/SSD on the model itself), so that it neither returns fewer than wanted nor spends time on
    detections below the threshold."""
    getattr(model, "roi_heads", model).score_thresh = score_threshold
    set_max_detections(model, max_detections)
