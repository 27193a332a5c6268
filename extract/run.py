"""The extraction job on every rank: each rank runs the model on its contiguous part of the inputs; after each
batch the ranks gather their results to rank 0, which alone holds the database connection and writes each rank's
batch in one transaction (SQLite allows one writer at a time; one writer keeps PostgreSQL simple too). Rank 0
first broadcasts the images this model has already done, so a re-run after a crash runs only the rest (an image
picked for annotation is run again for its drawing, but never written twice).
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_prep.class_list import ClassList
from extract.annotate import write_annotated
from extract.colour import add_colours
from extract.database import AttributesDB, Detection, ImageExtraction, SkippedImage, open_database
from extract.detector import Detector, load_detector
from extract.inputs import InputBatches, Loaded, list_input_files
from train.evaluate import predict
from train.shard_reader import split_shards
from train.strategy import Strategy

# Test hook: rank 0 kills itself (SIGKILL) while the Nth batch's transaction is open: inserted, not committed.
CRASH_AT_BATCH_ENV = "TRAIN_EXTRACT_CRASH_AT_BATCH"


@dataclass
class StepResult:
    """What one rank did with one batch; gathered to rank 0."""

    extractions: list[ImageExtraction] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    images: int = 0
    already_done: int = 0
    annotated: int = 0


@dataclass
class RunOptions:
    score_threshold: float
    max_detections: int
    annotate_limit: int | None  # annotate inputs with index below this; None: all
    annotate_dir: Path
    amp_dtype: torch.dtype | None
    colour: bool = True  # name each detection's dominant colour (extract/colour.py)


def rank_steps(detector: Detector, batches: Iterable[list[Loaded]], done: set[str], device: torch.device,
               options: RunOptions) -> Iterator[StepResult]:
    """Run the model on this rank's new images (and those to annotate), batch by batch."""
    for batch in batches:
        result = StepResult(images=len(batch), skipped=[item.skipped for item in batch if item.skipped])
        loaded = [item for item in batch if item.image is not None]
        wanted = [item for item in loaded if item.sha256 not in done or _to_annotate(item, options)]
        result.already_done = sum(item.sha256 in done for item in loaded)
        outputs = predict(detector.model, [item.image for item in wanted], device, options.amp_dtype)
        for item, output in zip(wanted, outputs, strict=True):
            detections = to_detections(output, detector.classes, options)
            if options.colour:
                detections = add_colours(item.image, detections, device)
            if item.sha256 not in done:
                height, width = item.image.shape[-2:]
                result.extractions.append(ImageExtraction(item.source, item.sha256, int(width), int(height),
                                                          detections))
            if _to_annotate(item, options):
                write_annotated(item, detections, options.annotate_dir)
                result.annotated += 1
        yield result


def _to_annotate(item: Loaded, options: RunOptions) -> bool:
    return options.annotate_limit is None or item.index < options.annotate_limit


def to_detections(output: dict, classes: ClassList, options: RunOptions) -> list[Detection]:
    """Detections at or above the threshold, best first, at most max_detections."""
    order = torch.argsort(output["scores"], descending=True, stable=True)
    detections = []
    for index in order.tolist()[: options.max_detections]:
        score = float(output["scores"][index])
        if score < options.score_threshold:
            break
        category = classes.category_of(int(output["labels"][index]))
        x1, y1, x2, y2 = (float(v) for v in output["boxes"][index].tolist())
        detections.append(Detection(category.name, category.category_id, score, (x1, y1, x2, y2)))
    return detections


# ---- the whole job -----------------------------------------------------------------------------------------
@dataclass
class Summary:
    ranks: int
    images: int = 0
    written: int = 0
    already_done: int = 0
    attributes: int = 0
    annotated: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)

    def add(self, step: StepResult, written: int) -> None:
        self.images += step.images
        self.written += written
        self.already_done += step.already_done
        self.attributes += sum(len(e.detections) for e in step.extractions)
        self.annotated += step.annotated
        self.skipped += step.skipped


def run_extraction(args: argparse.Namespace, strategy: Strategy) -> Summary | None:
    """Extract on every rank; rank 0 writes the database and returns the summary (None elsewhere)."""
    detector = load_detector(args.checkpoint, args.score_threshold, args.max_detections, args.backend)
    detector.model.to(strategy.device)
    db: AttributesDB | None = open_database(args.db) if strategy.is_main else None
    model_id, done = None, None
    if db is not None:
        model_id = db.register_model(args.checkpoint.resolve(), detector.architecture, detector.classes.names,
                                     detector.test_map, detector.test_ap_per_class)
        done = db.done_image_hashes(model_id)
    done = strategy.broadcast_object(done)
    if args.annotate != 0:
        args.annotate_dir.mkdir(parents=True, exist_ok=True)
    options = RunOptions(args.score_threshold, detector.max_detections, args.annotate, args.annotate_dir,
                         resolve_amp(args.amp, strategy.device), colour=args.colour)

    inputs = _input_kwargs(args)
    dataset = InputBatches(**inputs, batch_size=args.batch_size, rank=strategy.rank,
                           world_size=strategy.world_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=args.num_workers)
    total = len(inputs["files"]) if "files" in inputs else sum(s.num_samples for s in inputs["shards"])
    crash_at = int(os.environ.get(CRASH_AT_BATCH_ENV, "0"))
    summary = Summary(ranks=strategy.world_size)
    steps = rank_steps(detector, loader, done, strategy.device, options)
    try:
        with tqdm(total=total, unit="img", disable=not strategy.is_main, desc="extract") as bar:
            for step_number, gathered in enumerate(_gathered_steps(steps, strategy), start=1):
                if db is None:
                    continue
                hook = _crash if step_number == crash_at else None
                for step in gathered:
                    written = db.write_batch(model_id, step.extractions, step.skipped, args.score_threshold,
                                             options.max_detections, before_commit=hook)
                    summary.add(step, written)
                    bar.update(step.images)
    finally:
        if db is not None:
            db.close()
    return summary if strategy.is_main else None


def _gathered_steps(steps: Iterator[StepResult], strategy: Strategy) -> Iterator[list[StepResult]]:
    """Every rank's next StepResult, in rank order, until all ranks are done.

    Ranks may hold different numbers of batches, so a finished rank keeps joining the gather with None.
    A rank that fails raises on every rank (Strategy.all_gather_or_raise) rather than leave them waiting.
    """
    while True:
        local, error = None, None
        try:
            local = next(steps, None)
        except Exception as caught:
            error = caught
        gathered = strategy.all_gather_or_raise(local, error, "extraction")
        if all(step is None for step in gathered):
            return
        yield [step for step in gathered if step is not None]


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _input_kwargs(args: argparse.Namespace) -> dict:
    if args.input is not None:
        return {"files": list_input_files(args.input)}
    return {"shards": split_shards(args.manifest, args.split)}


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 autocast on a GPU, none on the CPU (where bf16 matmuls are usually slower)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if amp == "bf16" else None
