"""Precision-recall curves per class from COCOeval's accumulated precision, and each class's AP read from them.

COCOeval.accumulate() leaves eval["precision"], indexed [T IoU thresholds, R recall points, K categories, A area
ranges, M maxDets]: the interpolated precision at each of COCO's 101 recall points, 0 past the highest recall
a class reaches and -1 for a category without ground truth. AP is its mean over the recall points (and over the
IoU thresholds .50:.95), as summarize() computes it. The curves here are the same slices (area "all", the
largest maxDets), so a class's curve and its AP are two views of one array and cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrecisionRecall:
    """Per class (rows in category id order): precision at each recall point; NaN where undefined."""

    class_names: tuple[str, ...]
    recall: np.ndarray  # [R] the recall points (COCO: 0, 0.01, ..., 1)
    precision_50: np.ndarray  # [K, R] at IoU 0.5
    precision_50_95: np.ndarray  # [K, R] averaged over the IoU thresholds 0.5:0.95
    ap50: np.ndarray  # [K] the mean of precision_50 over recall: COCO's AP50 of the class
    ap: np.ndarray  # [K] the mean over IoU thresholds and recall: COCO's AP of the class

    @property
    def defined(self) -> np.ndarray:
        """[K] True for the classes with ground truth: the others have no curve and no AP."""
        return ~np.isnan(self.ap)


def precision_recall(coco_eval, class_names: Sequence[str]) -> PrecisionRecall:
    """The curves of an accumulated COCOeval; `class_names` in the order of its params.catIds."""
    params = coco_eval.params
    return curves_from_precision(coco_eval.eval["precision"], params.iouThrs, params.recThrs,
                                 params.areaRngLbl, class_names)


def curves_from_precision(
    precision: np.ndarray,
    iou_thresholds: Sequence[float],
    recall_points: Sequence[float],
    area_labels: Sequence[str],
    class_names: Sequence[str],
) -> PrecisionRecall:
    """The [T, R, K, A, M] precision array at area "all" and its last (largest) maxDets, as curves and APs."""
    if precision.shape[2] != len(class_names):
        raise ValueError(f"precision has {precision.shape[2]} categories, but {len(class_names)} names were given")
    per_iou = precision[:, :, :, list(area_labels).index("all"), -1]  # [T, R, K]
    iou_50 = int(np.argmin(np.abs(np.asarray(iou_thresholds) - 0.5)))
    return PrecisionRecall(
        class_names=tuple(class_names),
        recall=np.asarray(recall_points, dtype=float),
        precision_50=_defined_mean(per_iou[iou_50 : iou_50 + 1], axes=(0,)).T,
        precision_50_95=_defined_mean(per_iou, axes=(0,)).T,
        ap50=_defined_mean(per_iou[iou_50], axes=(0,)),
        ap=_defined_mean(per_iou, axes=(0, 1)),
    )


def _defined_mean(values: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Mean over `axes` of the entries that are not -1 (COCO's "no ground truth"); NaN where none is."""
    defined = values > -1
    count = defined.sum(axis=axes)
    total = np.where(defined, values, 0.0).sum(axis=axes)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
