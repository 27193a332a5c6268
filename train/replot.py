"""Draw the figures of a saved evaluation (again): PR curves per class, the confusion matrix, AP per class.

    python -m train.replot runs/demo_cpu/detections_test.json [--confusion-score 0.5] [--out DIR]

Every evaluation saves its detections (a COCO results list) and, beside them, its ground truth (<stem>_gt.json).
A test evaluation draws its figures itself (train/evaluate.py); this draws them from the files: for a validation
evaluation, at another confusion score, or for detections saved before the figures existed. The confusion score
and the cap on detections per image default to those of the run's config.yaml beside the detections, if any.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from train.config import EvalConfig
from train.eval_plots import EvalPlots
from train.evaluate import coco_evaluation, ground_truth_path, plot_evaluation


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.replot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("detections", type=Path, help="detections_<split>.json written by an evaluation")
    parser.add_argument("--out", type=Path, help="folder for the PNG files (default: the detections' folder)")
    parser.add_argument("--tag", help="the files' suffix: <plot>_<tag>.png (default: the split, from the name)")
    parser.add_argument("--confusion-score", type=float,
                        help="eval.confusion_score: the confusion matrix counts detections scoring at least this")
    parser.add_argument("--max-detections", type=int, help="eval.max_detections: COCOeval counts at most this many")
    args = parser.parse_args(argv)
    run_eval = run_eval_options(args.detections.parent / "config.yaml")
    args.confusion_score = run_eval.confusion_score if args.confusion_score is None else args.confusion_score
    args.max_detections = run_eval.max_detections if args.max_detections is None else args.max_detections
    return args


def run_eval_options(run_config: Path) -> EvalConfig:
    """The `eval` section of a run's saved config; defaults for what it lacks, or without one. Only that section
    is read, so that a run saved by an older version, with keys the schema has dropped since, still replots."""
    saved = yaml.safe_load(run_config.read_text()) if run_config.is_file() else None
    section = (saved or {}).get("eval") or {}
    known = {field.name for field in dataclasses.fields(EvalConfig)}
    return EvalConfig(**{key: value for key, value in section.items() if key in known})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    truth_path = ground_truth_path(args.detections)
    try:
        detections = json.loads(args.detections.read_text())
        ground_truth = json.loads(truth_path.read_text())
    except FileNotFoundError as error:
        raise SystemExit(f"{error.filename}: no such file (an evaluation writes both {args.detections.name} "
                         f"and {truth_path.name})") from None
    tag = args.tag or args.detections.stem.removeprefix("detections_")
    plots = EvalPlots(args.out or args.detections.parent, tag, args.confusion_score)
    coco_eval = coco_evaluation(ground_truth, detections, args.max_detections)
    for path in plot_evaluation(ground_truth, detections, coco_eval, plots).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
