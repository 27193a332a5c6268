"""A trained checkpoint as a detector ready for inference: built as it was trained, loaded strictly, with the
score threshold and per-image cap applied inside the model; or, with backend "onnxruntime", a model exported by
`python -m extract export` (extract/onnx_backend.py), which carries the same class list and test metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from data_prep.class_list import ClassList
from extract.onnx_backend import load_onnx_model
from train.checkpoint import checkpoint_classes, load_model_checkpoint
from train.evaluate import per_class_metrics
from train.model import model_from_checkpoint


@dataclass
class Detector:
    model: nn.Module
    architecture: str
    classes: ClassList  # what the model's labels mean
    test_map: float | None
    test_ap_per_class: dict[str, dict[str, float]]  # {} when the checkpoint records none


BACKENDS = ("torch", "onnxruntime")


def load_detector(path: Path, score_threshold: float, max_detections: int, backend: str = "torch") -> Detector:
    """The checkpoint's model, built as it was trained (name, sizes, BatchNorm kind) and loaded strictly; with
    backend "onnxruntime", the exported model at `path` run by onnxruntime."""
    if backend == "onnxruntime":
        model, metadata = load_onnx_model(path, score_threshold, max_detections)
        classes = ClassList.from_json(metadata["categories"], source=path)
        return Detector(model, metadata["architecture"], classes, stored_test_map(metadata),
                        per_class_metrics(metadata["test_metrics"]))
    state = load_model_checkpoint(path)
    model, model_cfg = model_from_checkpoint(state, path)
    limit_detections(model, score_threshold, max_detections)
    test_ap_per_class = per_class_metrics(state.get("test_metrics") or {})
    classes = checkpoint_classes(state, path)
    return Detector(model.eval(), model_cfg.name, classes, stored_test_map(state), test_ap_per_class)


def stored_test_map(state: dict) -> float | None:
    """The test-split COCO AP the checkpoint records (state["test_metrics"]["AP"]); None when it records none or
    the AP is undefined there (NaN): the database then says "unknown"."""
    value = (state.get("test_metrics") or {}).get("AP")
    return None if value is None or value != value else float(value)  # NaN: undefined on that split


def limit_detections(model: nn.Module, score_threshold: float, max_detections: int) -> None:
    """Apply the threshold and the per-image cap inside the model (Faster R-CNN keeps them on roi_heads,
    RetinaNet/FCOS/SSD on the model itself), so it never returns its default 100 when more are wanted."""
    owner = getattr(model, "roi_heads", model)
    owner.score_thresh = score_threshold
    owner.detections_per_img = max_detections
