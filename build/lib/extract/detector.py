"""A trained checkpoint as a detector ready for inference: built as it was trained, loaded strictly, with the
score threshold and per-image cap applied inside the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from train.checkpoint import load_checkpoint
from train.evaluate import per_class_metrics
from train.model import build_model, trained_model_config


@dataclass
class Detector:
    model: nn.Module
    architecture: str
    categories: dict[int, tuple[str, int]]  # contiguous label -> (name, original category id)
    test_map: float | None
    test_ap_per_class: dict[str, dict[str, float]]  # {} when the checkpoint records none

    @property
    def class_names(self) -> list[str]:
        return [self.categories[label][0] for label in sorted(self.categories)]


def load_detector(path: Path, score_threshold: float, max_detections: int) -> Detector:
    """The checkpoint's model, built as it was trained (name, sizes, BatchNorm kind) and loaded strictly."""
    state = load_checkpoint(path)
    missing = [key for key in ("model", "categories", "config") if key not in state]
    if missing:
        raise ValueError(f"{path}: not a train/main.py checkpoint (missing {', '.join(missing)})")
    model_cfg = trained_model_config(state, path)
    categories = {int(c["label"]): (str(c["name"]), int(c["category_id"])) for c in state["categories"]}
    model, _ = build_model(model_cfg, len(categories) + 1)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit model {model_cfg.name}: {error}") from error
    limit_detections(model, score_threshold, max_detections)
    test_ap_per_class = per_class_metrics(state.get("test_metrics") or {})
    return Detector(model.eval(), model_cfg.name, categories, stored_test_map(state), test_ap_per_class)


def stored_test_map(state: dict) -> float | None:
    """COCO AP on the test split when the checkpoint records one as state["test_metrics"]["AP"], else None.

    train/main.py records test metrics only in the checkpoint written after its final test evaluation; for
    the others (best.pt, earlier checkpoints) this is None: the database then says "unknown" rather than
    passing a validation AP off as a test AP.
    """
    value = (state.get("test_metrics") or {}).get("AP")
    return None if value is None or value != value else float(value)  # NaN: undefined on that split


def limit_detections(model: nn.Module, score_threshold: float, max_detections: int) -> None:
    """Apply the threshold and the per-image cap inside the model (Faster R-CNN keeps them on roi_heads,
    RetinaNet/FCOS/SSD on the model itself), so it never returns its default 100 when more are wanted."""
    owner = getattr(model, "roi_heads", model)
    owner.score_thresh = score_threshold
    owner.detections_per_img = max_detections
