"""Data, detectors and strategies shared by tests/test_evaluate.py and its 2-process gloo worker.

The detectors are real nn.Modules that read which sample they are looking at from the pixels (channel 0
holds the sample index), so they only answer correctly when evaluate() feeds them the images as float/255.
"""

from __future__ import annotations

import gc
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_prep.class_list import ClassList
from train.evaluate import evaluate
from train.strategy import Strategy

# Sparse category ids, as in COCO: label 1..K -> category_id.
CATEGORIES = ClassList.from_json([
    {"label": 1, "category_id": 3, "name": "bottle"},
    {"label": 2, "category_id": 17, "name": "box"},
    {"label": 3, "category_id": 90, "name": "can"},
], source="_evaluate_worker.py")

# image_id, (height, width), annotations as (x1, y1, x2, y2, label, iscrowd, area or None = box area).
SAMPLE_SPECS = [
    (101, (128, 128), [(5, 5, 15, 17, 1, 0, None), (30, 30, 70, 70, 2, 0, 900.0), (10, 20, 120, 120, 3, 0, None)]),
    (205, (96, 128), [(60, 10, 100, 50, 1, 0, None), (0, 40, 128, 96, 2, 1, 4000.0), (5, 5, 13, 13, 3, 0, None)]),
    (307, (128, 96), []),
    (411, (128, 128), [(10, 10, 50, 50, 2, 0, None), (40, 40, 90, 80, 2, 0, None), (0, 0, 100, 110, 1, 0, None)]),
    (512, (96, 96), [(70, 70, 80, 78, 3, 0, None), (20, 20, 60, 65, 3, 0, None)]),
    (613, (128, 128), [(8, 8, 120, 118, 2, 0, None)]),
]


def make_samples(specs=SAMPLE_SPECS) -> list[tuple[torch.Tensor, dict]]:
    """(uint8 image, evaluation target) pairs; channel 0 of image i is filled with the value i."""
    samples = []
    for index, (image_id, (height, width), objects) in enumerate(specs):
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        image[0] = index
        boxes = torch.tensor([o[:4] for o in objects], dtype=torch.float32).reshape(-1, 4)
        box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        target = {
            "boxes": boxes,
            "labels": torch.tensor([o[4] for o in objects], dtype=torch.int64),
            "image_id": image_id,
            "iscrowd": torch.tensor([o[5] for o in objects], dtype=torch.int64),
            "area": torch.tensor(
                [o[6] if o[6] is not None else float(box_areas[i]) for i, o in enumerate(objects)],
                dtype=torch.float32,
            ),
        }
        samples.append((image, target))
    return samples


def as_batches(samples: list, batch_size: int) -> list[tuple[list, list]]:
    return [
        ([image for image, _ in samples[i : i + batch_size]], [target for _, target in samples[i : i + batch_size]])
        for i in range(0, len(samples), batch_size)
    ]


class TableDetector(nn.Module):
    """Answers each sample with the detections stored for its index; records the mode it was called in."""

    def __init__(self, answers: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.answers = answers
        # A parameter and a buffer, so that a DistributedDataParallel wrapper would sync them in forward.
        self.weight = nn.Parameter(torch.ones(1))
        self.register_buffer("calls", torch.zeros(1))
        self.modes_seen: list[bool] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.modes_seen.append(self.training)
        outputs = []
        for image in images:
            if image.dtype != torch.float32 or image.max() > 1:
                raise TypeError("detector expects float images in [0, 1]")
            outputs.append(self.answers[round(float(image[0, 0, 0]) * 255)])
        return outputs


def ground_truth_answers(samples, *, shift: float = 0.0, include_crowd: bool = False, score: float = 1.0):
    """Per sample: the (non-crowd unless include_crowd) ground truth boxes, shifted right by `shift` px."""
    answers = []
    for _, target in samples:
        keep = torch.ones_like(target["iscrowd"], dtype=torch.bool) if include_crowd else target["iscrowd"] == 0
        boxes = target["boxes"][keep].clone()
        boxes[:, [0, 2]] += shift
        answers.append(
            {"boxes": boxes, "labels": target["labels"][keep], "scores": torch.full((len(boxes),), score)}
        )
    return answers


def perfect_detector(samples) -> TableDetector:
    return TableDetector(ground_truth_answers(samples))


def local_strategy() -> Strategy:
    """World size 1: the collectives are identities."""
    return Strategy(kind="single", device=torch.device("cpu"))


def gloo_strategy() -> Strategy:
    """train.strategy's DDP strategy on the torch.distributed group the test initialised."""
    return Strategy(kind="ddp", device=torch.device("cpu"), rank=dist.get_rank(), world_size=dist.get_world_size(),
                    backend="gloo")


def rank_parts(samples) -> dict[str, list[list]]:
    """How each world-size-2 scenario splits the samples over ranks 0 and 1."""
    return {
        # unequal counts (4 and 2 images) and a sample both ranks read
        "unequal": [samples[:4], samples[4:] + samples[1:2]],
        # a rank with no images at all
        "empty_rank": [samples, []],
    }


def run_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: evaluate each scenario and write what it returned to out_dir/rank{rank}.json."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        samples = make_samples()
        report = {}
        for name, parts in rank_parts(samples).items():
            # DDP-wrapped, as in training: evaluation must not run DDP's forward collectives.
            model = nn.parallel.DistributedDataParallel(perfect_detector(samples))
            report[name] = evaluate(
                model, as_batches(parts[rank], 2), CATEGORIES, gloo_strategy(), "cpu",
                Path(out_dir) / f"{name}.json",
            )
            report[f"{name}_shifted"] = evaluate(
                TableDetector(ground_truth_answers(samples, shift=6.0)), as_batches(parts[rank], 2), CATEGORIES,
                gloo_strategy(), "cpu", None,
            )
        failing = perfect_detector(samples)
        if rank == 1:
            failing.answers = []  # IndexError inside the forward of rank 1 only
        try:
            evaluate(failing, as_batches(rank_parts(samples)["unequal"][rank], 2), CATEGORIES, gloo_strategy(),
                     "cpu", None)
            report["failure"] = None
        except Exception as error:
            report["failure"] = f"{type(error).__name__}: {error}"
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        # As Strategy.teardown does: DDP wrappers sit in reference cycles and keep the group alive; collected only
        # at interpreter exit, gloo's threads die too late and the process aborts ("terminate called without an
        # active exception", SIGABRT).
        del model
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
