"""The first pass of `shard`: which images go where, decided before any image is decoded.

Repeated image ids are rejected; every image file is hashed in parallel (a file that cannot be hashed is
rejected with the reason images.py gives it); of images with the same bytes one is kept, the test input's,
else the lowest id; --subsample draws before hashing (--split-key id) or after it (content); the splits are
then assigned from ids or hashes alone.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from data_prep import splits as splitting
from data_prep.coco_input import CocoInput, ImageRecord
from data_prep.images import ImageRejected, normalize_image
from data_prep.report import Report
from data_prep.workers import Workers, progress_bar

TEST_SPLIT = "test"
HASH_CHUNKSIZE = 32

ImageKey = tuple[int, int]  # (input index, image id): ids repeat across inputs until duplicates are rejected


# runs in the pool's processes
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


def _default_splits(args: argparse.Namespace) -> str:
    return "train=0.9,val=0.1" if args.test_input else "train=0.8,val=0.1,test=0.1"


def split_spec(args: argparse.Namespace) -> splitting.SplitSpec:
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
    for image, (sha256, rejection) in zip(images, progress_bar(results, len(images), "hash"), strict=True):
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


def plan_splits(args, inputs: list[CocoInput], spec: splitting.SplitSpec, workers: Workers, report: Report) -> Plan:
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
