"""Shard COCO-format annotation files and image folders into WebDataset tars, manifest.json and report.json.

The run never holds the dataset's images: a first parallel pass hashes every image file (duplicate content,
--split-key content); splits are then assigned from ids and hashes alone; a second parallel pass decodes,
validates and normalises each image in sample order and streams it into its split's shards. Image ids are
unique across inputs (a --test-input is read first, then each --input in order; a repeated id is rejected
as duplicate_image_id). Every fix and rejection goes to report.json; see docs/data_format.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

import common
from data_prep import splits as splitting
from data_prep.coco_input import (
    AnnotationFileError,
    AnnotationRecord,
    BoxOutcome,
    CocoInput,
    ImageRecord,
    InputSpec,
    annotation_problem,
    load_coco,
    merge_categories,
    to_shard_annotation,
)
from data_prep.images import ImageRejected, normalize_image
from data_prep.manifest import build_manifest, write_manifest
from data_prep.report import Report, format_report_table, format_split_table, write_report
from data_prep.shard_writer import (
    MANIFEST_NAME,
    REPORT_NAME,
    OutputDirError,
    ShardWriter,
    prepare_output_dir,
    remove_stale_outputs,
)

TEST_SPLIT = "test"
TRAIN_SPLIT = "train"
HASH_CHUNKSIZE = 32
SAMPLE_CHUNKSIZE = 4
PENDING_CHUNKS_PER_WORKER = 4  # bounds the normalised images waiting in memory for the shard writer
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

ImageKey = tuple[int, int]  # (input index, image id): ids repeat across inputs until duplicates are rejected


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


# ---- parallel map with bounded memory ------------------------------------------------------------------


class _Feed:
    """Hands items to Pool.imap's feeding thread only while few results wait for the consumer."""

    def __init__(self, items: list, limit: int):
        self.items = items
        self._slots = threading.Semaphore(limit)
        self._stopped = threading.Event()

    def __iter__(self) -> Iterator:
        for item in self.items:
            self._slots.acquire()
            if self._stopped.is_set():
                return
            yield item

    def consumed_one(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        """Wake and end the feeding thread: until it ends, the pool can neither run other work nor shut down."""
        self._stopped.set()
        self._slots.release()


class Workers:
    """Worker processes (none when num_workers is 0) with an ordered map that reads ahead a bounded amount.

    Pool.imap alone reads its whole input ahead and buffers every result the consumer has not taken yet, so
    normalised images would pile up in memory whenever the shard writer is slower than the workers.
    Leaving the context, also on an error in the consumer, stops every feed before the pool shuts down.
    """

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self._pool: multiprocessing.pool.Pool | None = None
        self._feeds: list[_Feed] = []

    def __enter__(self) -> Workers:
        if self.num_workers > 0:
            self._pool = multiprocessing.Pool(self.num_workers)
        return self

    def __exit__(self, *exc_info) -> None:
        for feed in self._feeds:
            feed.stop()
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def ordered_map(self, function: Callable, items: list, chunksize: int) -> Iterator:
        """function over items, results in input order, at most a few chunks per worker ahead of the consumer."""
        if self._pool is None:
            yield from map(function, items)
            return
        feed = _Feed(items, limit=chunksize * self.num_workers * PENDING_CHUNKS_PER_WORKER)
        self._feeds.append(feed)
        try:
            for result in self._pool.imap(function, feed, chunksize):
                feed.consumed_one()
                yield result
        finally:
            feed.stop()


def _progress(iterable: Iterable, total: int, description: str) -> tqdm:
    return tqdm(iterable, total=total, desc=description, unit="img", mininterval=1.0, file=sys.stderr)


# ---- worker functions (run in the pool's processes) -----------------------------------------------------


def _hash_file(image: ImageRecord) -> tuple[str | None, tuple[str, str] | None]:
    """(sha256 of the file bytes, None), or (None, (reason, detail)) for a missing, unreadable or empty file."""
    try:
        data = image.path.read_bytes()
    except OSError:
        data = b""
    if data:
        return hashlib.sha256(data).hexdigest(), None
    try:  # let images.py name the problem, so that a reason has one name whichever pass finds it
        normalize_image(image.path, image.width, image.height)
    except ImageRejected as rejected:
        return None, (rejected.reason, rejected.detail)
    return None, ("unreadable", "the file could not be read for hashing")


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


def _prepare_sample(task: SampleTask, labels: dict[int, int]) -> PreparedSample:
    image = task.image
    try:
        normalized = normalize_image(image.path, image.width, image.height)
    except ImageRejected as rejected:
        return PreparedSample((rejected.reason, rejected.detail))
    if normalized.sha256 != task.sha256:
        return PreparedSample(("file_changed", "the file's bytes changed between the hashing and writing passes"))
    outcomes = tuple(
        to_shard_annotation(annotation, normalized.width, normalized.height, labels[annotation.category_id])
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


def _default_splits(args: argparse.Namespace) -> str:
    return "train=0.9,val=0.1" if args.test_input else "train=0.8,val=0.1,test=0.1"


def _split_spec(args: argparse.Namespace) -> splitting.SplitSpec:
    spec = splitting.parse_splits(args.splits or _default_splits(args))
    if args.test_input and TEST_SPLIT in spec.names:
        raise ValueError(f"--splits names '{TEST_SPLIT}', which --test-input already is")
    return spec


def _reject_repeated_ids(inputs: list[CocoInput], report: Report) -> list[ImageRecord]:
    """The images whose id no earlier input used; later repeats are rejected."""
    first: dict[int, ImageRecord] = {}
    for coco in inputs:
        for image in coco.images:
            if image.image_id in first:
                report.reject_image(image, "duplicate_image_id", f"image id also in {first[image.image_id].source}")
            else:
                first[image.image_id] = image
    return list(first.values())


def _hash_files(images: list[ImageRecord], workers: Workers, report: Report) -> dict[int, str]:
    """image id -> sha256 of its file bytes; images whose file cannot be hashed are rejected."""
    hashes = {}
    results = workers.ordered_map(_hash_file, images, HASH_CHUNKSIZE)
    for image, (sha256, rejection) in zip(images, _progress(results, len(images), "hash"), strict=True):
        if rejection is None:
            hashes[image.image_id] = sha256
        else:
            report.reject_image(image, *rejection)
    return hashes


def _reject_duplicate_content(
    images: list[ImageRecord], hashes: dict[int, str], test_indexes: set[int], report: Report
) -> list[ImageRecord]:
    """Keep one image per file content: the test input's if any, else the lowest id."""
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for image in images:
        by_hash[hashes[image.image_id]].append(image)
    kept_images = []
    for sha256, group in by_hash.items():
        group.sort(key=lambda image: (image.input_index not in test_indexes, image.image_id))
        kept, *repeats = group
        kept_images.append(kept)
        for repeat in repeats:
            report.add_duplicate(kept, repeat, sha256)
            report.reject_image(repeat, "duplicate_content", f"same file bytes as image {kept.image_id}")
    return kept_images


@dataclass
class Plan:
    """Which images go where, decided before any image is decoded."""

    splits: dict[str, list[ImageRecord]]  # in sample order
    not_drawn: set[ImageKey]  # left out by --subsample or by split counts: not part of the run's input
    hashes: dict[int, str]
    selection: dict


def _plan(args, inputs: list[CocoInput], spec: splitting.SplitSpec, workers: Workers, report: Report) -> Plan:
    images = _reject_repeated_ids(inputs, report)
    test_indexes = {index for index, coco in enumerate(inputs) if coco.spec.is_test}
    input_images = [image for image in images if image.input_index not in test_indexes]
    test_images = [image for image in images if image.input_index in test_indexes]
    not_drawn: list[ImageRecord] = []

    def draw_subsample(key_of: Callable[[ImageRecord], str]) -> None:
        nonlocal input_images
        keys = {image.image_id: key_of(image) for image in input_images}
        drawn = splitting.subsample(keys, args.subsample, args.seed)
        not_drawn.extend(image for image in input_images if image.image_id not in drawn)
        input_images = [image for image in input_images if image.image_id in drawn]

    if args.subsample and args.split_key == "id":  # before hashing: hash only the images drawn
        draw_subsample(lambda image: str(image.image_id))
    hashes = _hash_files(test_images + input_images, workers, report)
    test_images = [image for image in test_images if image.image_id in hashes]
    input_images = [image for image in input_images if image.image_id in hashes]
    if args.subsample and args.split_key == "content":
        draw_subsample(lambda image: hashes[image.image_id])
    subsampled_out = len(not_drawn)

    survivors = _reject_duplicate_content(test_images + input_images, hashes, test_indexes, report)
    kept = {image.image_id for image in survivors}
    by_id = {image.image_id: image for image in test_images + input_images if image.image_id in kept}

    def key_of(image_id: int) -> str:
        return hashes[image_id] if args.split_key == "content" else str(image_id)

    assigned, leftover = splitting.assign_splits(
        {image.image_id: key_of(image.image_id) for image in input_images if image.image_id in kept}, spec, args.seed
    )
    if test_images:
        test_ids = [image.image_id for image in test_images if image.image_id in kept]
        assigned[TEST_SPLIT] = splitting.hash_order({image_id: key_of(image_id) for image_id in test_ids}, args.seed)
    not_drawn.extend(by_id[image_id] for image_id in leftover)
    return Plan(
        splits={name: [by_id[image_id] for image_id in ids] for name, ids in assigned.items()},
        not_drawn={(image.input_index, image.image_id) for image in not_drawn},
        hashes=hashes,
        selection={"splits": args.splits or _default_splits(args), "images_read": sum(len(c.images) for c in inputs),
                   "subsample": args.subsample,
                   "images_not_drawn_by_subsample": subsampled_out,
                   "images_not_drawn_by_split_counts": len(leftover)},
    )


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
    args, split: str, tasks: list[SampleTask], labels: dict[int, int], workers: Workers, report: Report
) -> tuple[ShardWriter, list[int], int]:
    """Normalise and write one split; returns the writer (its shards), the image ids written, annotations."""
    image_ids, num_annotations = [], 0
    results = workers.ordered_map(partial(_prepare_sample, labels=labels), tasks, SAMPLE_CHUNKSIZE)
    with ShardWriter(args.out, split, max_count=args.shard_max_count, max_bytes=args.shard_max_bytes) as writer:
        for task, result in zip(tasks, _progress(results, len(tasks), split), strict=True):
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
            image_ids.append(image.image_id)
            num_annotations += result.num_annotations
    return writer, image_ids, num_annotations


def _arguments_record(args: argparse.Namespace) -> dict:
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in sorted(vars(args).items()) if not callable(value)}


def run(args: argparse.Namespace) -> int:
    try:
        spec = _split_spec(args)
        inputs = [load_coco(input_spec, index) for index, input_spec in enumerate(_input_specs(args))]
        categories = merge_categories(inputs)
        prepare_output_dir(args.out, overwrite=args.overwrite)
    except (AnnotationFileError, OutputDirError, ValueError) as error:
        print(f"data_prep shard: error: {error}", file=sys.stderr)
        return 2
    labels = {category_id: label for category_id, (label, _) in categories.items()}
    report = Report()
    written: dict[str, tuple[list, list[int]]] = {}
    rows = []
    with Workers(args.num_workers) as workers:
        plan = _plan(args, inputs, spec, workers, report)
        annotations, annotations_in = _route_annotations(inputs, plan, report)
        for split, images in plan.splits.items():
            tasks = [SampleTask(image, tuple(sorted(annotations[(image.input_index, image.image_id)],
                                                    key=lambda annotation: annotation.annotation_id)),
                                plan.hashes[image.image_id])
                     for image in images]
            writer, image_ids, num_annotations = _write_split(args, split, tasks, labels, workers, report)
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
        categories=categories,
        splits=written,
    ))
    print(format_report_table(report_dict))
    print(format_split_table(rows))
    print(f"wrote {args.out / MANIFEST_NAME}")
    return 0
