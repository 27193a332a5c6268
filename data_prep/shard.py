"""Shard COCO-format annotation files and image folders into WebDataset tars, manifest.json and report.json.

The run never holds the dataset's images: a first parallel pass hashes every image file (duplicate content,
--split-key content); splits are then assigned from ids and hashes alone (both in shard_plan.py); a second
parallel pass, here, decodes, validates and normalises each image in sample order and streams it into its
split's shards. Image ids are
unique across inputs (a --test-input is read first, then each --input in order; a repeated id is rejected
as duplicate_image_id). Every fix and rejection goes to report.json; see docs/data_format.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import common
from data_prep.class_list import ClassList
from data_prep.coco_input import (
    AnnotationFileError,
    AnnotationRecord,
    BoxOutcome,
    CocoInput,
    ImageRecord,
    InputSpec,
    annotation_problem,
    load_coco,
    to_shard_annotation,
)
from data_prep.images import ImageRejected, normalize_image
from data_prep.manifest import AttributeCensus, build_manifest, write_manifest
from data_prep.report import Report, format_report_table, format_split_table, write_report
from data_prep.shard_plan import ImageKey, Plan, plan_splits, split_spec
from data_prep.shard_writer import (
    MANIFEST_NAME,
    REPORT_NAME,
    OutputDirError,
    ShardWriter,
    prepare_output_dir,
    remove_stale_outputs,
)
from data_prep.workers import Workers, progress_bar

TRAIN_SPLIT = "train"
SAMPLE_CHUNKSIZE = 4
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 256MB, 64MiB or 1000000")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative integer")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="ANNOTATIONS.json:IMAGE_DIR",
                        help="a COCO-format annotation file and its image folder (repeatable)")
    parser.add_argument("--test-input", metavar="ANNOTATIONS.json:IMAGE_DIR",
                        help="used as the test split as it is (e.g. COCO val2017); --splits then names the rest")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--splits", help="fractions, written with a decimal point (train=0.8,val=0.1,test=0.1, the "
                                         "default; train=0.9,val=0.1 with --test-input), or whole image counts "
                                         "(train=1600,val=200,test=200)")
    parser.add_argument("--split-key", choices=("id", "content"), default="id",
                        help="what an image's split is drawn from: its image id or the sha256 of its file bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subsample", type=_positive_int, metavar="N",
                        help="use a reproducible subsample of N images of the --input files before splitting")
    parser.add_argument("--shard-max-count", type=_positive_int, default=256, help="samples per shard at most")
    parser.add_argument("--shard-max-bytes", type=_byte_size, default="256MB", help="bytes per shard at most")
    parser.add_argument("--num-workers", type=_non_negative_int, default=min(8, os.cpu_count() or 1),
                        help="worker processes (0: work in this process)")
    parser.add_argument("--drop-empty-train", action="store_true",
                        help="reject images without annotations from the train split (kept in other splits)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty directory that is not a previous data_prep output")


# ---- worker functions (run in the pool's processes) -----------------------------------------------------


@dataclass(frozen=True)
class SampleTask:
    image: ImageRecord
    annotations: tuple[AnnotationRecord, ...]  # sorted by annotation id
    sha256: str  # of the file bytes when they were hashed


@dataclass(frozen=True)
class PreparedSample:
    rejection: tuple[str, str] | None
    jpeg: bytes = b""
    sample_json: bytes = b""
    image_fixes: tuple[str, ...] = ()
    image_detail: str = ""
    outcomes: tuple[BoxOutcome, ...] = ()  # one per task annotation

    @property
    def num_annotations(self) -> int:
        return sum(outcome.annotation is not None for outcome in self.outcomes)


def _prepare_sample(task: SampleTask, classes: ClassList) -> PreparedSample:
    image = task.image
    try:
        normalized = normalize_image(image.path, image.width, image.height)
    except ImageRejected as rejected:
        return PreparedSample((rejected.reason, rejected.detail))
    if normalized.sha256 != task.sha256:
        return PreparedSample(("file_changed", "the file's bytes changed between the hashing and writing passes"))
    outcomes = tuple(
        to_shard_annotation(annotation, normalized.width, normalized.height, classes.label_of(annotation.category_id))
        for annotation in task.annotations
    )
    sample = {
        "image_id": image.image_id,
        "file_name": image.file_name,
        "source": image.source,
        "width": normalized.width,
        "height": normalized.height,
        "annotations": [outcome.annotation for outcome in outcomes if outcome.annotation is not None],
    }
    return PreparedSample(
        rejection=None,
        jpeg=normalized.jpeg,
        sample_json=json.dumps(sample, separators=(",", ":")).encode(),
        image_fixes=normalized.fixes,
        image_detail=normalized.detail,
        outcomes=outcomes,
    )


# ---- the steps of a run ---------------------------------------------------------------------------------


def _input_specs(args: argparse.Namespace) -> list[InputSpec]:
    specs = [InputSpec.parse(args.test_input, is_test=True)] if args.test_input else []
    return specs + [InputSpec.parse(text) for text in args.input]


def _route_annotations(
    inputs: list[CocoInput], plan: Plan, report: Report
) -> tuple[dict[ImageKey, list[AnnotationRecord]], int]:
    """Annotations per assigned image, and how many annotations are input to the run; every other
    annotation of a drawn image is dropped with a reason."""
    assigned = {(image.input_index, image.image_id) for images in plan.splits.values() for image in images}
    known = {(image.input_index, image.image_id) for coco in inputs for image in coco.images}
    per_image: dict[ImageKey, list[AnnotationRecord]] = defaultdict(list)
    annotations_in = 0
    for index, coco in enumerate(inputs):
        for annotation in coco.annotations:
            key = (index, annotation.image_id) if type(annotation.image_id) is int else None
            if key in plan.not_drawn:
                continue
            annotations_in += 1
            if key not in known:
                report.drop_annotation(annotation, "unknown_image", f"no image with id {annotation.image_id!r}")
            elif problem := annotation_problem(annotation, coco.categories):
                report.drop_annotation(annotation, *problem)
            elif key not in assigned:
                report.drop_annotation(annotation, "image_rejected", "its image was rejected")
            else:
                per_image[key].append(annotation)
    return per_image, annotations_in


def _write_split(
    args, split: str, tasks: list[SampleTask], classes: ClassList, workers: Workers, report: Report,
    census: AttributeCensus,
) -> tuple[ShardWriter, list[int], int]:
    """Normalise and write one split; returns the writer (its shards), the image ids written, annotations."""
    image_ids, num_annotations = [], 0
    results = workers.ordered_map(partial(_prepare_sample, classes=classes), tasks, SAMPLE_CHUNKSIZE)
    with ShardWriter(args.out, split, max_count=args.shard_max_count, max_bytes=args.shard_max_bytes) as writer:
        for task, result in zip(tasks, progress_bar(results, len(tasks), split), strict=True):
            image = task.image
            if result.rejection is not None:
                report.reject_image(image, *result.rejection)
                for annotation in task.annotations:
                    report.drop_annotation(annotation, "image_rejected", f"image rejected: {result.rejection[0]}")
                continue
            for annotation, outcome in zip(task.annotations, result.outcomes, strict=True):
                if outcome.dropped is not None:
                    report.drop_annotation(annotation, *outcome.dropped)
                for fix in outcome.fixes:
                    report.fix_annotation(annotation, *fix)
            if args.drop_empty_train and split == TRAIN_SPLIT and result.num_annotations == 0:
                report.reject_image(image, "empty_train_image", "no annotations (--drop-empty-train)")
                continue
            for fix in result.image_fixes:
                report.fix_image(image, fix, result.image_detail)
            writer.write(f"{image.image_id:012d}", [("jpg", result.jpeg), ("json", result.sample_json)])
            report.count_written(result.num_annotations)
            for outcome in result.outcomes:
                if outcome.annotation is not None and "attributes" in outcome.annotation:
                    census.add(outcome.annotation["attributes"])
            image_ids.append(image.image_id)
            num_annotations += result.num_annotations
    return writer, image_ids, num_annotations


def _arguments_record(args: argparse.Namespace) -> dict:
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in sorted(vars(args).items()) if not callable(value)}


def run(args: argparse.Namespace) -> int:
    try:
        spec = split_spec(args)
        inputs = [load_coco(input_spec, index) for index, input_spec in enumerate(_input_specs(args))]
        classes = ClassList.union([ClassList.from_names(coco.categories) for coco in inputs],
                                  [str(coco.spec.annotations) for coco in inputs])
        prepare_output_dir(args.out, overwrite=args.overwrite)
    except (AnnotationFileError, OutputDirError, ValueError) as error:
        print(f"data_prep shard: error: {error}", file=sys.stderr)
        return 2
    report = Report()
    written: dict[str, tuple[list, list[int]]] = {}
    rows = []
    census = AttributeCensus()
    with Workers(args.num_workers) as workers:
        plan = plan_splits(args, inputs, spec, workers, report)
        annotations, annotations_in = _route_annotations(inputs, plan, report)
        for split, images in plan.splits.items():
            tasks = [SampleTask(image, tuple(sorted(annotations[(image.input_index, image.image_id)],
                                                    key=lambda annotation: annotation.annotation_id)),
                                plan.hashes[image.image_id])
                     for image in images]
            writer, image_ids, num_annotations = _write_split(args, split, tasks, classes, workers, report,
                                                               census)
            written[split] = (writer.shards, image_ids)
            rows.append((split, len(image_ids), num_annotations, len(writer.shards)))

    images_in = plan.selection["images_read"] - len(plan.not_drawn)
    report_dict = report.to_dict(images_in=images_in, annotations_in=annotations_in, selection=plan.selection)
    write_report(args.out / REPORT_NAME, report_dict)
    remove_stale_outputs(args.out, keep={shard.file for shards, _ in written.values() for shard in shards})
    write_manifest(args.out / MANIFEST_NAME, build_manifest(
        tool_version=common.__version__,
        arguments=_arguments_record(args),
        inputs=[{"annotations": str(coco.spec.annotations), "images": str(coco.spec.images), "sha256": coco.sha256,
                 "test_input": coco.spec.is_test} for coco in inputs],
        classes=classes,
        splits=written,
        attributes=census,
    ))
    print(format_report_table(report_dict))
    print(format_split_table(rows))
    print(f"wrote {args.out / MANIFEST_NAME}")
    return 0
