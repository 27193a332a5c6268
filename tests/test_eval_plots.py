"""An evaluation's figures: the confusion counts on hand-made detections, the PR curves and AP bars as slices of
COCOeval's precision array, the PNG files an evaluation writes."""

import json

import numpy as np
import pytest
from _evaluate_worker import CATEGORIES, TableDetector, as_batches, ground_truth_answers, local_strategy, make_samples
from PIL import Image

from train.config import load_config, save_config
from train.confusion import confusion_matrix
from train.eval_plots import PLOT_NAMES, EvalPlots, draw_pr_curves, write_eval_plots
from train.evaluate import coco_evaluation, evaluate, ground_truth_path
from train.pr_curves import curves_from_precision, precision_recall
from train.replot import main as replot

BACKGROUND = 3  # CATEGORIES has 3 classes: bottle (id 3), box (17), can (90)


def coco(*images):
    """A COCO ground truth dict and results list from (ground truth, detections) per image; xywh boxes."""
    ground_truth = {"images": [], "annotations": [],
                    "categories": [{"id": c.category_id, "name": c.name} for c in CATEGORIES]}
    detections = []
    for image_id, (truth, found) in enumerate(images, start=1):
        ground_truth["images"].append({"id": image_id, "width": 200, "height": 200})
        ground_truth["annotations"] += [{"id": len(ground_truth["annotations"]) + 1 + i, "image_id": image_id,
                                         "category_id": c, "bbox": b, "iscrowd": crowd, "area": b[2] * b[3]}
                                        for i, (c, b, crowd) in enumerate(truth)]
        detections += [{"image_id": image_id, "category_id": c, "bbox": b, "score": s} for c, b, s in found]
    return ground_truth, detections


def test_confusion_counts_hits_confusions_misses_and_false_detections():
    first = (
        [(3, [0, 0, 20, 20], 0),      # bottle: found as a bottle
                      (17, [40, 40, 20, 20], 0),   # box: found, but as a bottle
                      (90, [80, 80, 20, 20], 0),   # can: only a detection below the score threshold
                      (17, [120, 120, 60, 60], 1)],  # a crowd of boxes: no object
        [(3, [1, 1, 20, 20], 0.9),
                    (3, [0, 0, 20, 19], 0.8),      # a second bottle on the bottle: a false detection
                    (3, [41, 40, 20, 20], 0.7),
                    (90, [80, 80, 20, 20], 0.2),   # below 0.25: not counted
                    (90, [130, 130, 20, 20], 0.9),  # inside the crowd: not counted
                    (17, [150, 0, 30, 30], 0.5)],  # on nothing: a false box
    )
    second = ([(90, [10, 10, 50, 50], 0)], [(90, [12, 10, 50, 50], 0.3)])

    matrix = confusion_matrix(*coco(first, second), score_threshold=0.25)

    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1  # bottle as bottle
    expected[1, 0] = 1  # box as bottle
    expected[2, 2] = 1  # can as can (second image)
    expected[2, BACKGROUND] = 1  # the can of the first image: missed
    expected[BACKGROUND, 0] = 1  # the duplicate bottle
    expected[BACKGROUND, 1] = 1  # the box on nothing
    assert matrix.tolist() == expected.tolist()
    # At a lower threshold the can's weak detection finds it: the miss becomes a hit.
    assert confusion_matrix(*coco(first), score_threshold=0.1)[2].tolist() == [0, 0, 1, 0]


def test_a_detection_matches_one_box_and_the_higher_score_wins():
    two_boxes = ([(3, [0, 0, 20, 20], 0), (3, [10, 0, 20, 20], 0)],  # IoU 1/3 with each other
                 [(17, [0, 0, 20, 20], 0.6), (3, [0, 0, 20, 20], 0.95)])
    matrix = confusion_matrix(*coco(two_boxes), score_threshold=0.0)
    # the bottle (0.95) takes the first box; the box detection (0.6) overlaps it by IoU 1 and the second by 1/3:
    # it matches nothing and counts as a false box; the second bottle box is missed
    assert matrix[0].tolist() == [1, 0, 0, 1] and matrix[BACKGROUND].tolist() == [0, 1, 0, 0]


def test_curves_and_ap_bars_are_the_right_slices_of_the_precision_array():
    rng = np.random.default_rng(0)
    iou_thresholds = np.linspace(0.5, 0.95, 10)
    recall = np.linspace(0, 1, 101)
    area_labels = ["small", "all", "medium", "large"]  # "all" not first: the slice must look it up
    precision = rng.random((10, 101, 3, 4, 3))  # [T, R, K, A, M]
    precision[:, :, 2] = -1  # the third class has no ground truth

    curves = curves_from_precision(precision, iou_thresholds, recall, area_labels, ["bottle", "box", "can"])

    at_all_largest = precision[:, :, :, 1, 2]
    for k in range(2):
        assert np.array_equal(curves.precision_50[k], at_all_largest[0, :, k])
        assert np.allclose(curves.precision_50_95[k], at_all_largest[:, :, k].mean(axis=0))
        assert curves.ap50[k] == pytest.approx(at_all_largest[0, :, k].mean())
        assert curves.ap[k] == pytest.approx(at_all_largest[:, :, k].mean())
        assert curves.ap[k] == pytest.approx(curves.precision_50_95[k].mean())  # the bar is the curve's mean
    assert curves.defined.tolist() == [True, True, False]
    assert np.isnan(curves.precision_50[2]).all() and np.isnan(curves.ap[2]) and np.isnan(curves.ap50[2])
    with pytest.raises(ValueError, match="3 categories, but 2 names"):
        curves_from_precision(precision, iou_thresholds, recall, area_labels, ["bottle", "box"])


def test_a_test_evaluation_writes_its_figures_from_the_numbers_it_reports(tmp_path):
    samples = make_samples()
    answers = ground_truth_answers(samples, shift=3.0, score=0.9)
    plots = EvalPlots(tmp_path / "run", "test", confusion_score=0.25)
    out_path = tmp_path / "run" / "detections_test.json"

    metrics = evaluate(TableDetector(answers), as_batches(samples, 2), CATEGORIES, local_strategy(), "cpu",
                       out_path, plots=plots)

    for name in PLOT_NAMES:
        path = plots.paths()[name]
        assert path.name == f"{name}_test.png"
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10  # drawn on, not a blank canvas
    # the curves drawn are those the metrics come from
    ground_truth = json.loads(ground_truth_path(out_path).read_text())
    coco_eval = coco_evaluation(ground_truth, json.loads(out_path.read_text()))
    curves = precision_recall(coco_eval, [c.name for c in CATEGORIES])
    for k, name in enumerate(curves.class_names):
        assert curves.ap[k] == metrics[f"AP/{name}"] and curves.ap50[k] == metrics[f"AP50/{name}"]


def test_figures_of_classes_without_ground_truth_and_of_many_classes_draw(tmp_path):
    names = [f"class {k}" for k in range(40)]
    precision = np.full((10, 101, 40, 4, 3), -1.0)
    precision[:, :, :20] = np.linspace(1, 0, 101)[None, :, None, None, None]
    curves = curves_from_precision(precision, np.linspace(0.5, 0.95, 10), np.linspace(0, 1, 101),
                                   ["all", "small", "medium", "large"], names)
    confusion = np.arange(41 * 41).reshape(41, 41)
    paths = write_eval_plots(EvalPlots(tmp_path, "val", 0.5), curves, confusion)
    assert all(path.stat().st_size > 10_000 for path in paths.values())
    legend = draw_pr_curves(curves).axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()][:2] == ["class 0 0.500", "class 1 0.500"]
    assert len(legend.get_texts()) == 21  # the 20 classes with ground truth and their mean


def test_replot_draws_a_saved_evaluation_again_with_its_run_config(tmp_path, capsys):
    samples = make_samples()
    run_dir = tmp_path / "run"
    evaluate(TableDetector(ground_truth_answers(samples, shift=3.0, score=0.9)), as_batches(samples, 2), CATEGORIES,
             local_strategy(), "cpu", run_dir / "detections_test.json", plots=EvalPlots(run_dir, "test", 0.25))

    assert replot([str(run_dir / "detections_test.json"), "--out", str(tmp_path / "again")]) == 0
    for name in PLOT_NAMES:  # the same numbers drawn again: the same files
        assert (tmp_path / "again" / f"{name}_test.png").read_bytes() == (run_dir / f"{name}_test.png").read_bytes()
    assert capsys.readouterr().out.splitlines()[0] == str(tmp_path / "again" / "pr_curves_test.png")

    # the run's config.yaml sets the confusion score: at 0.95 the detections (0.9) are not counted
    save_config(load_config(None, ["eval.confusion_score=0.95"]), run_dir / "config.yaml")
    assert replot([str(run_dir / "detections_test.json"), "--out", str(tmp_path / "strict")]) == 0
    strict, again = tmp_path / "strict", tmp_path / "again"
    assert (strict / "pr_curves_test.png").read_bytes() == (again / "pr_curves_test.png").read_bytes()
    assert (strict / "confusion_matrix_test.png").read_bytes() != (again / "confusion_matrix_test.png").read_bytes()
    with pytest.raises(SystemExit, match="nowhere_gt.json|nowhere.json"):
        replot([str(tmp_path / "nowhere.json")])
