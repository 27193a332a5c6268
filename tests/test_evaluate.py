"""train.evaluate: COCO metrics from fake and real detectors, saved JSON re-scored, 1 vs 2 gloo ranks."""

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from _evaluate_worker import (
    CATEGORIES,
    SAMPLE_SPECS,
    TableDetector,
    as_batches,
    ground_truth_answers,
    local_strategy,
    make_samples,
    perfect_detector,
    rank_parts,
    run_rank,
)
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_prep.class_list import ClassList
from train.evaluate import (
    METRIC_STATS_INDEX,
    PER_CLASS_METRICS,
    evaluate,
    ground_truth_path,
    per_class_metrics,
    score_detections,
)

METRIC_NAMES = set(METRIC_STATS_INDEX) | {f"{metric}/{c.name}" for metric in PER_CLASS_METRICS
                                          for c in CATEGORIES}


def run_evaluate(model, samples, out_path=None, categories=CATEGORIES, **kwargs):
    return evaluate(model, as_batches(samples, 2), categories, local_strategy(), "cpu", out_path, **kwargs)


def summary(metrics):
    return {name: metrics[name] for name in METRIC_STATS_INDEX}


def rescore_with_plain_pycocotools(out_path):
    coco_gt = COCO(str(ground_truth_path(out_path)))
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(out_path)), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats


def test_perfect_detector_scores_one_and_saves_json_that_rescores_the_same(tmp_path):
    samples = make_samples()
    model = perfect_detector(samples)
    model.train()
    out_path = tmp_path / "eval" / "val_epoch1.json"

    metrics = run_evaluate(model, samples, out_path)

    assert set(metrics) == METRIC_NAMES
    assert all(type(value) is float for value in summary(metrics).values())
    assert summary(metrics) == pytest.approx({name: 1.0 for name in METRIC_STATS_INDEX})
    assert per_class_metrics(metrics) == {"bottle": {"AP": 1.0, "AP50": 1.0, "gt_boxes": 3},
                                          "box": {"AP": 1.0, "AP50": 1.0, "gt_boxes": 4},  # not the crowd one
                                          "can": {"AP": 1.0, "AP50": 1.0, "gt_boxes": 4}}
    assert model.modes_seen and not any(model.modes_seen), "the model must run in eval mode"
    assert model.training, "evaluate must give the model back in the mode it found it"

    stats = rescore_with_plain_pycocotools(out_path)
    # faster-coco-eval scores, pycocotools is the reference: equal up to float summation order (1 ulp here)
    assert {name: float(stats[index]) for name, index in METRIC_STATS_INDEX.items()} == pytest.approx(
        summary(metrics), rel=0, abs=1e-12)
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["val_epoch1.json", "val_epoch1_gt.json"]

    detections = json.loads(out_path.read_text())
    assert {d["category_id"] for d in detections} == {3, 17, 90}
    first = next(d for d in detections if d["image_id"] == 101)
    assert first == {"image_id": 101, "category_id": 3, "bbox": [5.0, 5.0, 10.0, 12.0], "score": 1.0}

    ground_truth = json.loads(ground_truth_path(out_path).read_text())
    assert [(i["id"], i["height"], i["width"]) for i in ground_truth["images"]] == [
        (image_id, *size) for image_id, size, _ in SAMPLE_SPECS
    ]
    assert ground_truth["categories"] == [{"id": 3, "name": "bottle"}, {"id": 17, "name": "box"},
                                          {"id": 90, "name": "can"}]
    by_area = {a["area"]: a for a in ground_truth["annotations"]}
    assert by_area[900.0]["bbox"] == [30.0, 30.0, 40.0, 40.0]  # the target's area, not the box's 1600
    assert by_area[4000.0]["iscrowd"] == 1 and by_area[4000.0]["category_id"] == 17
    assert len({a["id"] for a in ground_truth["annotations"]}) == len(ground_truth["annotations"])
    assert min(a["id"] for a in ground_truth["annotations"]) >= 1


def test_shifted_boxes_lower_ap():
    samples = make_samples()
    metrics = run_evaluate(TableDetector(ground_truth_answers(samples, shift=6.0)), samples)

    assert metrics["AP"] < 0.8
    assert metrics["AP75"] < metrics["AP50"] <= 1.0


def test_crowd_regions_are_neither_misses_nor_false_positives():
    samples = make_samples()
    hits_crowd_too = TableDetector(ground_truth_answers(samples, include_crowd=True))
    assert run_evaluate(hits_crowd_too, samples)["AP"] == pytest.approx(1.0)

    # Control: the same crowd box counted as an ordinary object is a miss for the perfect detector.
    for _, target in samples:
        target["iscrowd"] = torch.zeros_like(target["iscrowd"])
    metrics = run_evaluate(perfect_detector(make_samples()), samples)
    assert metrics["AR100"] < 1.0 and metrics["AP"] < 1.0


def test_false_positive_on_an_image_without_annotations_counts():
    samples = make_samples()
    answers = ground_truth_answers(samples, score=0.9)
    empty_index = next(i for i, (_, target) in enumerate(samples) if len(target["boxes"]) == 0)
    answers[empty_index] = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]),
                            "labels": torch.tensor([2]), "scores": torch.tensor([1.0])}

    assert run_evaluate(TableDetector(answers), samples)["AP"] < 1.0


def test_zero_detections_score_zero_and_still_save(tmp_path):
    samples = make_samples()
    nothing = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    out_path = tmp_path / "empty.json"

    metrics = run_evaluate(TableDetector([nothing] * len(samples)), samples, out_path)

    assert summary(metrics) == {name: 0.0 for name in METRIC_STATS_INDEX}
    assert {(row["AP"], row["AP50"]) for row in per_class_metrics(metrics).values()} == {(0.0, 0.0)}
    assert json.loads(out_path.read_text()) == []
    assert len(json.loads(ground_truth_path(out_path).read_text())["images"]) == len(samples)


def test_undefined_area_ranges_are_nan():
    small_only = [(1, (64, 64), [(4, 4, 14, 14, 1, 0, None)]), (2, (64, 64), [(30, 30, 40, 38, 3, 0, None)])]
    samples = make_samples(small_only)

    metrics = run_evaluate(perfect_detector(samples), samples)

    assert metrics["AP"] == metrics["AP_small"] == pytest.approx(1.0)
    assert math.isnan(metrics["AP_medium"]) and math.isnan(metrics["AP_large"])


def test_per_class_ap_of_found_shifted_missed_and_absent_classes():
    """bottle found exactly, box shifted to IoU 2/3 (a match at thresholds .50 to .65: 4 of 10), can never
    found, shoe predicted but absent from the ground truth: AP 1, 0.4, 0, undefined."""
    categories = ClassList.from_json([*CATEGORIES.to_json(), {"label": 4, "category_id": 44, "name": "shoe"}],
                                     source="test")
    specs = [(1, (128, 128), [(10, 10, 50, 50, 1, 0, None), (60, 60, 100, 100, 2, 0, None),
                              (0, 90, 30, 120, 3, 0, None)]),
             (2, (128, 128), [(20, 20, 60, 60, 1, 0, None), (70, 0, 128, 40, 2, 1, None)])]
    samples = make_samples(specs)
    answers = ground_truth_answers(samples)
    keep = answers[0]["labels"] != 3  # the can is missed
    boxes = answers[0]["boxes"][keep].clone()
    boxes[1, [0, 2]] += 8.0  # the box: 32 of 40 columns overlap, IoU 1280 / 1920
    answers[0] = {"boxes": torch.cat([boxes, torch.tensor([[80.0, 80.0, 120.0, 120.0]])]),
                  "labels": torch.tensor([1, 2, 4]), "scores": torch.tensor([0.9, 0.8, 0.7])}

    metrics = run_evaluate(TableDetector(answers), samples, categories=categories)

    per_class = per_class_metrics(metrics)
    assert list(per_class) == ["bottle", "box", "shoe", "can"]  # in category id order: 3, 17, 44, 90
    assert per_class["bottle"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "gt_boxes": 2}
    assert per_class["box"] == {"AP": pytest.approx(0.4), "AP50": pytest.approx(1.0), "gt_boxes": 1}
    assert per_class["can"] == {"AP": 0.0, "AP50": 0.0, "gt_boxes": 1}
    assert math.isnan(per_class["shoe"]["AP"]) and math.isnan(per_class["shoe"]["AP50"])
    assert per_class["shoe"]["gt_boxes"] == 0
    # COCO's AP is the mean over the classes that have ground truth
    assert metrics["AP"] == pytest.approx((1.0 + 0.4 + 0.0) / 3)
    assert metrics["AP50"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)


def test_score_threshold_drops_low_scoring_detections(tmp_path):
    samples = make_samples()
    answers = ground_truth_answers(samples)
    low_scoring = {"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "labels": torch.tensor([1]),
                   "scores": torch.tensor([0.01])}
    answers[0] = {key: torch.cat([value, low_scoring[key]]) for key, value in answers[0].items()}

    run_evaluate(TableDetector(answers), samples, tmp_path / "all.json")
    run_evaluate(TableDetector(answers), samples, tmp_path / "kept.json", score_threshold=0.05)

    all_scores = [d["score"] for d in json.loads((tmp_path / "all.json").read_text())]
    kept_scores = [d["score"] for d in json.loads((tmp_path / "kept.json").read_text())]
    assert len(all_scores) == len(kept_scores) + 1 and min(kept_scores) == 1.0


def test_unknown_predicted_label_names_the_image_and_label():
    samples = make_samples()
    answers = ground_truth_answers(samples)
    answers[0] = {**answers[0], "labels": torch.full_like(answers[0]["labels"], 4)}

    with pytest.raises(ValueError, match=r"image 101: prediction label 4 is not in the manifest"):
        run_evaluate(TableDetector(answers), samples)


def test_two_gloo_ranks_give_the_same_metrics_and_files_as_one(tmp_path):
    samples = make_samples()
    (tmp_path / "ws1").mkdir()
    expected = {}
    for name in rank_parts(samples):
        expected[name] = run_evaluate(perfect_detector(samples), samples, tmp_path / "ws1" / f"{name}.json")
        expected[f"{name}_shifted"] = run_evaluate(TableDetector(ground_truth_answers(samples, shift=6.0)), samples)
    assert expected["unequal_shifted"]["AP"] < 1.0

    mp.spawn(run_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert {key: report[key] for key in expected} == expected
    for name in rank_parts(samples):
        assert (tmp_path / f"{name}.json").read_bytes() == (tmp_path / "ws1" / f"{name}.json").read_bytes()
        assert (tmp_path / f"{name}_gt.json").read_bytes() == (tmp_path / "ws1" / f"{name}_gt.json").read_bytes()
    # A crash on rank 1 is raised on rank 0 too instead of leaving it waiting in a collective.
    assert reports[1]["failure"].startswith("IndexError")
    assert reports[0]["failure"].startswith("RuntimeError: evaluation failed on rank 1: IndexError")


def test_real_torchvision_detector_output_flows_through(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=CATEGORIES.num_classes, box_score_thresh=0.0,
        min_size=96, max_size=96,
    )
    specs = [(7, (96, 96), [(10, 10, 60, 70, 1, 0, None)]), (8, (96, 80), [(5, 20, 40, 90, 3, 0, None)]),
             (9, (80, 96), [])]
    samples = [(torch.randint(0, 256, image.shape, dtype=torch.uint8), target)
               for image, target in make_samples(specs)]
    out_path = tmp_path / "real.json"

    metrics = evaluate(model, as_batches(samples, 2), CATEGORIES, local_strategy(), "cpu", out_path,
                       amp_dtype=torch.bfloat16)

    assert set(metrics) == METRIC_NAMES and all(type(v) is float for v in summary(metrics).values())
    detections = json.loads(out_path.read_text())
    assert detections, "an untrained detector with box_score_thresh=0 still returns boxes"
    assert {d["image_id"] for d in detections} <= {7, 8, 9}
    assert {d["category_id"] for d in detections} <= {3, 17, 90}
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 and d["bbox"][3] >= 0 for d in detections)
    stats = rescore_with_plain_pycocotools(out_path)
    assert float(stats[0]) == pytest.approx(metrics["AP"], nan_ok=True)


def test_the_scorer_prints_only_the_summary_and_only_when_verbose(capsys):
    samples = make_samples()

    run_evaluate(perfect_detector(samples), samples)
    assert capsys.readouterr().out == ""

    run_evaluate(perfect_detector(samples), samples, verbose=True)
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in printed
    assert "index created" not in printed and "Loading and preparing results" not in printed


def test_scores_match_plain_pycocotools_on_a_crowded_noisy_result_set(tmp_path):
    """The reference check of the scorer (faster-coco-eval) against pycocotools: 40 images, 1-12 boxes each over
    three classes, some crowd, 60 detections per image (jittered true boxes and random ones), all 12 stats and
    the per-class AP and AP50 that train/evaluate.py derives from the accumulated precision."""
    generator = torch.Generator().manual_seed(0)
    images, annotations, detections = [], [], []
    for image_id in range(1, 41):
        images.append({"id": image_id, "width": 320, "height": 240})
        for _ in range(int(torch.randint(1, 13, (1,), generator=generator))):
            x, y = (torch.rand(2, generator=generator) * torch.tensor([250.0, 180.0])).tolist()
            w, h = (torch.rand(2, generator=generator) * 60 + 4).tolist()
            category = [3, 17, 90][int(torch.randint(0, 3, (1,), generator=generator))]
            crowd = int(torch.rand(1, generator=generator) < 0.05)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd})
            jitter = (torch.randn(4, generator=generator) * 3).tolist()
            detections.append({"image_id": image_id, "category_id": category, "score": 0.5 + 0.5 * float(
                torch.rand(1, generator=generator)), "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1),
                                                               max(h + jitter[3], 1)]})
        while sum(d["image_id"] == image_id for d in detections) < 60:
            x, y, w, h = (torch.rand(4, generator=generator) * torch.tensor([250.0, 180.0, 60.0, 60.0]) + 1).tolist()
            detections.append({"image_id": image_id, "category_id": [3, 17, 90][len(detections) % 3],
                               "score": 0.6 * float(torch.rand(1, generator=generator)), "bbox": [x, y, w, h]})
    categories = [{"id": category.category_id, "name": category.name} for category in CATEGORIES]
    ground_truth = {"images": images, "annotations": annotations, "categories": categories}

    metrics = score_detections(ground_truth, detections)

    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    coco_gt = COCO(str(tmp_path / "gt.json"))
    reference = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    assert 0.3 < metrics["AP50"] < 1.0, "a case where ranking and matching matter"
    defined = {name: float(reference.stats[index]) for name, index in METRIC_STATS_INDEX.items()}
    defined = {name: value if value != -1 else math.nan for name, value in defined.items()}  # -1: no such boxes
    assert summary(metrics) == pytest.approx(defined, rel=0, abs=1e-12, nan_ok=True)
    precision = reference.eval["precision"][:, :, :, 0, 2]  # area all, 100 detections
    for k, category in enumerate(CATEGORIES):
        assert metrics[f"AP/{category.name}"] == pytest.approx(float(precision[:, :, k].mean()), abs=1e-12)
        assert metrics[f"AP50/{category.name}"] == pytest.approx(float(precision[0, :, k].mean()), abs=1e-12)
