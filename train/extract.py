"""Run a trained checkpoint over images and store the attributes it finds in a database.

    python -m train.extract CHECKPOINT --input photos/ --db attributes.sqlite
    python -m train.extract CHECKPOINT --input 'photos/**/*.jpg' --db postgresql://user:password@host/db
    python -m train.extract CHECKPOINT --manifest data/synth/shards/manifest.json --split test
    torchrun --nproc_per_node=2 -m train.extract CHECKPOINT --input photos/
    python -m train.extract query attributes.sqlite (--image PATH|KEY | --attribute NAME | --class-ap | ...)

Files go through data_prep's normalisation (EXIF orientation, RGB, alpha) exactly as training images did,
so boxes are in pixels of the upright image; a file it rejects (corrupt, truncated, not an image) is skipped,
listed at the end and stored in the `skipped` table with its reason. Shard samples are decoded as the
training reader decodes them. Image rows are keyed by the sha256 of the original bytes.

Under torchrun every rank reads and runs the model on its own contiguous part of the inputs. After each
batch the ranks gather their results to rank 0, which alone holds the database connection and writes each
rank's batch in one transaction (SQLite allows one writer at a time; one writer keeps PostgreSQL simple
too). Rank 0 first broadcasts the images this model has already done, so a re-run after a crash runs only
the rest (an image picked for annotation is run again for its drawing, but never written twice).
"""

from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from data_prep.images import ImageRejected, normalize_image
from train.attributes_db import (
    AttributesDB,
    Detection,
    ImageExtraction,
    SkippedImage,
    display_name,
    file_sha256,
    open_database,
)
from train.checkpoint import load_checkpoint
from train.evaluate import per_class_metrics, predict
from train.model import build_model, trained_model_config
from train.shard_reader import Shard, iter_raw_samples, rank_segments, split_shards
from train.strategy import Strategy, setup_strategy

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})
# Test hook: rank 0 kills itself (SIGKILL) while the Nth batch's transaction is open: inserted, not committed.
CRASH_AT_BATCH_ENV = "TRAIN_EXTRACT_CRASH_AT_BATCH"
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4")


# ---- the model ---------------------------------------------------------------------------------------------
@dataclass
class Detector:
    model: nn.Module
    architecture: str
    categories: dict[int, tuple[str, int]]  # contiguous label -> (name, original category id)
    test_map: float | None
    test_ap_per_class: dict[str, dict[str, float]]  # {} when the checkpoint records none

    @property
    def class_names(self) -> list[str]:
        return [self.categories[label][0] for label in sorted(self.categories)]


def load_detector(path: Path, score_threshold: float, max_detections: int) -> Detector:
    """The checkpoint's model, built as it was trained (name, sizes, BatchNorm kind) and loaded strictly."""
    state = load_checkpoint(path)
    missing = [key for key in ("model", "categories", "config") if key not in state]
    if missing:
        raise ValueError(f"{path}: not a train/main.py checkpoint (missing {', '.join(missing)})")
    model_cfg = trained_model_config(state, path)
    categories = {int(c["label"]): (str(c["name"]), int(c["category_id"])) for c in state["categories"]}
    model, _ = build_model(model_cfg, len(categories) + 1)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit model {model_cfg.name}: {error}") from error
    limit_detections(model, score_threshold, max_detections)
    test_ap_per_class = per_class_metrics(state.get("test_metrics") or {})
    return Detector(model.eval(), model_cfg.name, categories, stored_test_map(state), test_ap_per_class)


def stored_test_map(state: dict) -> float | None:
    """COCO AP on the test split when the checkpoint records one as state["test_metrics"]["AP"], else None.

    train/main.py records test metrics only in the checkpoint written after its final test evaluation; for
    the others (best.pt, earlier checkpoints) this is None: the database then says "unknown" rather than
    passing a validation AP off as a test AP.
    """
    value = (state.get("test_metrics") or {}).get("AP")
    return None if value is None or value != value else float(value)  # NaN: undefined on that split


def limit_detections(model: nn.Module, score_threshold: float, max_detections: int) -> None:
    """Apply the threshold and the per-image cap inside the model (Faster R-CNN keeps them on roi_heads,
    RetinaNet/FCOS/SSD on the model itself), so it never returns its default 100 when more are wanted."""
    owner = getattr(model, "roi_heads", model)
    owner.score_thresh = score_threshold
    owner.detections_per_img = max_detections


# ---- inputs ------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """One input read by a loader worker: the image, or why it was skipped."""

    index: int  # position in the whole input, across ranks
    source: str  # file path or shard key
    image: torch.Tensor | None = None  # uint8 [3, H, W]
    sha256: str = ""
    skipped: SkippedImage | None = None


def list_input_files(spec: str) -> list[Path]:
    """A folder (recursively, files with an image suffix), a glob pattern, or one file; sorted, absolute."""
    path = Path(spec)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():
        files = [path]
    elif glob.has_magic(spec):
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    else:
        raise FileNotFoundError(f"--input {spec}: no such file or folder, and not a glob pattern")
    if not files:
        raise FileNotFoundError(f"--input {spec}: no image files found")
    return sorted(p.resolve() for p in files)


def load_file(path: Path) -> tuple[str, torch.Tensor]:
    normalized = normalize_image(path, None, None)
    jpeg = torch.frombuffer(bytearray(normalized.jpeg), dtype=torch.uint8)
    return normalized.sha256, decode_jpeg(jpeg, mode=ImageReadMode.RGB)


def load_shard_sample(sample: dict) -> tuple[str, torch.Tensor]:
    data = sample["jpg"]
    try:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise ImageRejected("undecodable", str(error)) from error
    return hashlib.sha256(data).hexdigest(), image


class InputBatches(IterableDataset):
    """This rank's contiguous part of the inputs, in batches of `Loaded`; worker w loads batches w, w+W, ...

    The part is [N*rank/world, N*(rank+1)/world) of the input order, so ranks are disjoint and cover it all.
    """

    def __init__(self, *, files: list[Path] | None = None, shards: list[Shard] | None = None, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        if (files is None) == (shards is None):
            raise ValueError("InputBatches needs either files or shards")
        self.files, self.shards, self.batch_size = files, shards, batch_size
        self.rank, self.world_size = rank, world_size
        total = len(files) if files is not None else sum(shard.num_samples for shard in shards)
        self.start, self.stop = total * rank // world_size, total * (rank + 1) // world_size

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def _readers(self) -> Iterator[tuple[int, str, Callable[[], tuple[str, torch.Tensor]]]]:
        """(index, source, read) for each input of the rank; `read` does the expensive part."""
        if self.files is not None:
            for index in range(self.start, self.stop):
                path = self.files[index]
                yield index, str(path), functools.partial(load_file, path)
            return
        segments = rank_segments(self.shards, seed=0, epoch=0, rank=self.rank, world_size=self.world_size,
                                 training=False)
        index = self.start
        for segment in segments:
            for position, sample in enumerate(iter_raw_samples(segment.shard.path)):
                if position >= segment.stop:
                    break
                if position >= segment.start:
                    yield index, f"{segment.shard.path.name}/{sample['__key__']}", functools.partial(
                        load_shard_sample, sample)
                    index += 1

    def __iter__(self) -> Iterator[list[Loaded]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        batch: list[tuple] = []
        batch_index = 0
        for reader in self._readers():
            batch.append(reader)
            if len(batch) == self.batch_size:
                if batch_index % num_workers == worker_id:
                    yield [_load(*item) for item in batch]
                batch, batch_index = [], batch_index + 1
        if batch and batch_index % num_workers == worker_id:
            yield [_load(*item) for item in batch]


def _load(index: int, source: str, read: Callable[[], tuple[str, torch.Tensor]]) -> Loaded:
    try:
        sha256, image = read()
    except ImageRejected as rejected:
        return Loaded(index, source, skipped=SkippedImage(source, rejected.reason, rejected.detail))
    return Loaded(index, source, image=image, sha256=sha256)


# ---- one rank's work ---------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one rank did with one batch; gathered to rank 0."""

    extractions: list[ImageExtraction] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    images: int = 0
    already_done: int = 0
    annotated: int = 0
    error: str | None = None


@dataclass
class RunOptions:
    score_threshold: float
    max_detections: int
    annotate_limit: int | None  # annotate inputs with index below this; None: all
    annotate_dir: Path
    amp_dtype: torch.dtype | None


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
            detections = to_detections(output, detector.categories, options)
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


def to_detections(output: dict, categories: dict[int, tuple[str, int]],
                  options: RunOptions) -> list[Detection]:
    """Detections at or above the threshold, best first, at most max_detections."""
    order = torch.argsort(output["scores"], descending=True, stable=True)
    detections = []
    for index in order.tolist()[: options.max_detections]:
        score = float(output["scores"][index])
        if score < options.score_threshold:
            break
        name, category_id = categories[int(output["labels"][index])]
        x1, y1, x2, y2 = (float(v) for v in output["boxes"][index].tolist())
        detections.append(Detection(name, category_id, score, (x1, y1, x2, y2)))
    return detections


def write_annotated(item: Loaded, detections: list[Detection], out_dir: Path) -> Path:
    """The image with its boxes and "name score" labels drawn, as PNG; named by input position and source."""
    image = item.image
    if detections:
        colors = [PALETTE[d.category_id % len(PALETTE)] for d in detections]
        labels = [f"{d.name} {d.score:.2f}" for d in detections]
        boxes = torch.tensor([d.box for d in detections])
        image = draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=2)
    path = out_dir / f"{item.index:06d}_{Path(item.source).stem}.png"
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
    return path


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
    detector = load_detector(args.checkpoint, args.score_threshold, args.max_detections)
    detector.model.to(strategy.device)
    db: AttributesDB | None = open_database(args.db) if strategy.is_main else None
    model_id, done = None, None
    if db is not None:
        model_id = db.register_model(args.checkpoint.resolve(), detector.architecture, detector.class_names,
                                     detector.test_map, detector.test_ap_per_class)
        done = db.done_image_hashes(model_id)
    done = strategy.broadcast_object(done)
    if args.annotate != 0:
        args.annotate_dir.mkdir(parents=True, exist_ok=True)
    options = RunOptions(args.score_threshold, args.max_detections, args.annotate, args.annotate_dir,
                         resolve_amp(args.amp, strategy.device))

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
                                             args.max_detections, before_commit=hook)
                    summary.add(step, written)
                    bar.update(step.images)
    finally:
        if db is not None:
            db.close()
    return summary if strategy.is_main else None


def _gathered_steps(steps: Iterator[StepResult], strategy: Strategy) -> Iterator[list[StepResult]]:
    """Every rank's next StepResult, in rank order, until all ranks are done.

    Ranks may hold different numbers of batches, so a finished rank keeps joining the gather with None.
    A rank that fails sends its error instead, and every rank raises it rather than wait in a collective.
    """
    while True:
        try:
            local = next(steps, None)
        except Exception as error:
            local = StepResult(error=f"{type(error).__name__}: {error}")
            if strategy.world_size == 1:
                raise
        gathered = strategy.all_gather_object(local)
        failures = [f"rank {rank}: {step.error}" for rank, step in enumerate(gathered) if step and step.error]
        if failures:
            raise RuntimeError(f"extraction failed on {'; '.join(failures)}")
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


def print_summary(summary: Summary, args: argparse.Namespace) -> None:
    print(f"images: {summary.images} read, {summary.written} new, {summary.already_done} already done, "
          f"{len(summary.skipped)} skipped (on {summary.ranks} rank(s)); {summary.attributes} attributes "
          f"found; database {display_name(args.db)}")
    print(f"annotated images: {summary.annotated} in {args.annotate_dir}")
    for skipped in summary.skipped:
        print(f"  skipped {skipped.source}: {skipped.reason} ({skipped.detail})")


# ---- command line ------------------------------------------------------------------------------------------
def parse_annotate(value: str) -> int | None:
    if value == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"--annotate takes a count >= 0 or 'all', got {value!r}")
    return count


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by train/main.py (best.pt, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a folder of images (recursive), a glob pattern or one image file")
    source.add_argument("--manifest", type=Path, help="a data_prep manifest.json; needs --split")
    parser.add_argument("--split", help="the manifest's split to read (train, val, test)")
    parser.add_argument("--db", default="attributes.sqlite", help="SQLite file or postgresql:// URL")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="loader processes per rank")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--max-detections", type=int, default=100, help="per image")
    parser.add_argument("--annotate", type=parse_annotate, default=4,
                        help="draw boxes on the first N images, or 'all' (default 4)")
    parser.add_argument("--annotate-dir", type=Path, default=Path("annotated"))
    parser.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                        help="autocast dtype; auto = bf16 on a GPU, off on the CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    if args.manifest is not None and args.split is None:
        parser.error("--manifest needs --split")
    if args.batch_size < 1 or args.max_detections < 1 or args.num_workers < 0:
        parser.error("--batch-size and --max-detections must be >= 1, --num-workers >= 0")
    return args


def parse_query_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.extract query",
                                     description="Read the attributes database.")
    parser.add_argument("db", help="SQLite file or postgresql:// URL")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="an image file (matched by content) or a stored path / shard key")
    what.add_argument("--attribute", help="images where this attribute (class name) was detected")
    what.add_argument("--counts", action="store_true", help="detections and images per attribute")
    what.add_argument("--models", action="store_true", help="the registered models")
    what.add_argument("--class-ap", action="store_true",
                      help="per model and class: AP, AP50 and ground truth boxes on the test split")
    what.add_argument("--skipped", action="store_true", help="input files that were skipped, with reasons")
    parser.add_argument("--model", type=int, help="only this model id")
    parser.add_argument("--min-score", type=float, default=0.0, help="with --attribute")
    return parser.parse_args(argv)


def run_query(args: argparse.Namespace) -> list[dict]:
    with open_database(args.db) as db:
        if args.image is not None:
            image = Path(args.image)
            key = file_sha256(image) if image.is_file() else args.image
            return db.attributes_of_image(key, args.model)
        if args.attribute is not None:
            return db.images_with_attribute(args.attribute, args.min_score, args.model)
        if args.counts:
            return db.attribute_counts(args.model)
        if args.class_ap:
            return db.class_ap(args.model)
        return db.models() if args.models else db.skipped()


def print_rows(rows: list[dict]) -> None:
    if not rows:
        print("(no rows)")
        return
    print("\t".join(rows[0]))
    for row in rows:
        print("\t".join(_cell(value) for value in row.values()))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["query"]:
        rows = run_query(parse_query_args(argv[1:]))
        try:
            print_rows(rows)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped early (`... | head`): not an error of the query
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail
        return 0
    args = parse_args(argv)
    strategy = setup_strategy("auto", args.device)
    summary = run_extraction(args, strategy)
    if summary is not None:
        print_summary(summary, args)
    strategy.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
