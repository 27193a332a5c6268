"""COCO 'bbox' evaluation time: pycocotools against faster-coco-eval (what train/evaluate.py scores with, adopted
on this benchmark's figures), on a COCO-sized synthetic results file, and whether the two give the same numbers.

    python bench/coco_eval_speed.py --images 5000 --detections 100 --out docs/bench_results/coco_eval_speed.jsonl

Ground truth: 1-15 boxes per image over 5 classes, some crowd; results: for each image `--detections`
detections, a jittered copy of every ground truth box with a high score and random boxes with random scores for
the rest. Each library loads the same two JSON-ready dicts and runs evaluate + accumulate + summarize, timed
`--repeats` times each, alternating; the medians and the largest difference between the 12 stats are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from results import append_result

NUM_CLASSES = 5


def synthetic_coco(images: int, detections: int, seed: int) -> tuple[dict, list[dict]]:
    """(ground truth dict, results list) for `images` images of 640x480, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    gt_images, annotations, results = [], [], []
    for image_id in range(1, images + 1):
        gt_images.append({"id": image_id, "width": 640, "height": 480})
        count = int(rng.integers(1, 16))
        boxes = _random_boxes(rng, count)
        labels = rng.integers(1, NUM_CLASSES + 1, count)
        for box, label in zip(boxes, labels, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box.tolist(), "area": float(box[2] * box[3]),
                                "iscrowd": int(rng.random() < 0.02)})
        jittered = boxes + rng.normal(0, 3, boxes.shape)
        jittered[:, 2:] = np.maximum(jittered[:, 2:], 1)
        noise = _random_boxes(rng, max(detections - count, 0))
        all_boxes = np.concatenate([jittered, noise])[:detections]
        all_labels = np.concatenate([labels, rng.integers(1, NUM_CLASSES + 1, len(noise))])[:detections]
        scores = np.concatenate([rng.uniform(0.5, 1.0, count), rng.uniform(0.0, 0.6, len(noise))])[:detections]
        results += [{"image_id": image_id, "category_id": int(label), "bbox": box.tolist(), "score": float(score)}
                    for box, label, score in zip(all_boxes, all_labels, scores, strict=True)]
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES + 1)]
    return {"images": gt_images, "annotations": annotations, "categories": categories}, results


def _random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """xywh boxes inside a 640x480 image, 8 to 200 px a side."""
    sizes = rng.uniform(8, 200, (count, 2))
    corners = rng.uniform(0, 1, (count, 2)) * (np.array([640, 480]) - sizes)
    return np.concatenate([corners, sizes], axis=1).round(2)


def run_pycocotools(ground_truth: dict, results: list[dict]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = ground_truth
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return time.perf_counter() - start, np.array(evaluator.stats)


def run_faster_coco_eval(ground_truth: dict, results: list[dict]) -> tuple[float, np.ndarray]:
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = FasterCOCO(ground_truth)
        evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return time.perf_counter() - start, np.array(evaluator.stats[:12])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="append the summary as one JSON line here")
    args = parser.parse_args()

    ground_truth, results = synthetic_coco(args.images, args.detections, args.seed)
    times: dict[str, list[float]] = {"pycocotools": [], "faster_coco_eval": []}
    stats: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, run in (("pycocotools", run_pycocotools), ("faster_coco_eval", run_faster_coco_eval)):
            seconds, stats[name] = run(ground_truth, results)
            times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    difference = float(np.abs(stats["pycocotools"] - stats["faster_coco_eval"]).max())
    summary = {
        "bench": "coco_eval_speed", "images": args.images, "detections": len(results),
        "ground_truth_boxes": len(ground_truth["annotations"]), "repeats": args.repeats,
        "median_s": medians, "speedup": medians["pycocotools"] / medians["faster_coco_eval"],
        "max_stat_difference": difference, "pycocotools_stats": stats["pycocotools"].round(6).tolist(),
        "cpu": platform.processor(),
    }
    print(f"{args.images} images, {len(results)} detections, {len(ground_truth['annotations'])} ground truth boxes")
    for name, median in medians.items():
        print(f"  {name:17s} median {median:7.2f} s over {args.repeats} runs")
    print(f"  speed-up {summary['speedup']:.1f}x; largest difference between the 12 stats {difference:.2e}")
    if args.out:
        append_result(Path(args.out), summary)


if __name__ == "__main__":
    main()
