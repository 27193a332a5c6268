"""A detector's confusion matrix at one operating point: which class each object was detected as, if at all.

Rows are the true class, columns the detected class; the last row and column are "background": a ground-truth
box no detection matched is counted in (its class, background), a detection that matched no box in (background,
its class). Only detections scoring at least `score_threshold` count, and a detection matches a box when their
IoU is at least `iou_threshold`, whatever the two classes (that is how a class confusion shows).

Matching, vectorised per image: every (detection, box) pair above the IoU threshold is ranked by detection
score, then IoU; each detection keeps its first-ranked pair, then each box the first-ranked detection left for
it (Ultralytics' scheme, ranked by score as COCOeval's greedy matching is). Unlike a sequential greedy match, a
detection whose best box went to a higher-scoring one is not re-matched to its second best: it counts as a false
detection. Crowd boxes are no objects: they are never missed, and a detection lying mostly inside one (its
intersection over the detection's own area at least the IoU threshold, as COCOeval treats crowds) is not counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

IOU_THRESHOLD = 0.5


def confusion_matrix(
    ground_truth: dict,
    detections: Sequence[dict],
    score_threshold: float,
    iou_threshold: float = IOU_THRESHOLD,
) -> np.ndarray:
    """[K + 1, K + 1] counts of COCO `detections` (a results list) against a COCO `ground_truth` dict, as
    train/evaluate.py scores them; index k is the k-th category in id order (COCOeval's), index K background."""
    index_of = {category_id: index for index, category_id in
                enumerate(sorted(int(c["id"]) for c in ground_truth["categories"]))}
    background = len(index_of)
    annotations, found_by_image = defaultdict(list), defaultdict(list)
    for annotation in ground_truth["annotations"]:
        annotations[annotation["image_id"]].append(annotation)
    for detection in detections:
        if detection["score"] >= score_threshold:
            found_by_image[detection["image_id"]].append(detection)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    for image in ground_truth["images"]:
        truth = [a for a in annotations[image["id"]] if not a.get("iscrowd", 0)]
        crowds = [a for a in annotations[image["id"]] if a.get("iscrowd", 0)]
        found = found_by_image[image["id"]]
        matrix += image_confusion(
            _xyxy([a["bbox"] for a in truth]), np.array([index_of[a["category_id"]] for a in truth], dtype=np.int64),
            _xyxy([d["bbox"] for d in found]), np.array([index_of[d["category_id"]] for d in found], dtype=np.int64),
            torch.tensor([d["score"] for d in found], dtype=torch.float64), _xyxy([a["bbox"] for a in crowds]),
            background, iou_threshold,
        )
    return matrix


def image_confusion(
    gt_boxes: torch.Tensor,
    gt_classes: np.ndarray,
    det_boxes: torch.Tensor,
    det_classes: np.ndarray,
    det_scores: torch.Tensor,
    crowd_boxes: torch.Tensor,
    background: int,
    iou_threshold: float = IOU_THRESHOLD,
) -> np.ndarray:
    """One image's [K + 1, K + 1] counts; boxes xyxy, classes 0..K-1, K = `background`."""
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    det_matched, gt_matched = _match(box_iou(det_boxes, gt_boxes), det_scores, iou_threshold)
    np.add.at(matrix, (gt_classes[gt_matched], det_classes[det_matched]), 1)
    missed = np.setdiff1d(np.arange(len(gt_classes)), gt_matched)
    np.add.at(matrix, (gt_classes[missed], background), 1)
    false = np.setdiff1d(np.arange(len(det_classes)), det_matched)
    false = false[~_inside_crowd(det_boxes[torch.from_numpy(false)], crowd_boxes, iou_threshold)]
    np.add.at(matrix, (background, det_classes[false]), 1)
    return matrix


def _match(iou: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(detection indices, box indices) of the matched pairs: see the module's docstring."""
    det_index, gt_index = (index.numpy() for index in torch.nonzero(iou >= iou_threshold, as_tuple=True))
    pair_iou = iou[det_index, gt_index].numpy()
    order = np.lexsort((-pair_iou, -scores.numpy()[det_index]))  # the last key sorts first: score, then IoU
    det_index, gt_index = det_index[order], gt_index[order]
    best_per_detection = np.sort(np.unique(det_index, return_index=True)[1])
    det_index, gt_index = det_index[best_per_detection], gt_index[best_per_detection]
    best_per_box = np.sort(np.unique(gt_index, return_index=True)[1])
    return det_index[best_per_box], gt_index[best_per_box]


def _inside_crowd(det_boxes: torch.Tensor, crowd_boxes: torch.Tensor, threshold: float) -> np.ndarray:
    """Per detection: True when its intersection with some crowd box covers at least `threshold` of its area."""
    if len(crowd_boxes) == 0 or len(det_boxes) == 0:
        return np.zeros(len(det_boxes), dtype=bool)
    top_left = torch.maximum(det_boxes[:, None, :2], crowd_boxes[None, :, :2])
    bottom_right = torch.minimum(det_boxes[:, None, 2:], crowd_boxes[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area = (det_boxes[:, 2:] - det_boxes[:, :2]).prod(dim=1).clamp(min=1e-12)
    return ((intersection / area[:, None]) >= threshold).any(dim=1).numpy()


def _xyxy(xywh: Sequence[Sequence[float]]) -> torch.Tensor:
    boxes = torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
