"""Run a trained checkpoint over images and store the attributes it finds in a database.

    python -m extract CHECKPOINT --input photos/ --db attributes.sqlite
    python -m extract CHECKPOINT --input 'photos/**/*.jpg' --db postgresql://user:password@host/db
    python -m extract CHECKPOINT --manifest data/synth/shards/manifest.json --split test
    torchrun --nproc_per_node=2 -m extract CHECKPOINT --input photos/
    python -m extract query attributes.sqlite (--image PATH|KEY | --attribute NAME | --class-ap | ...)
    python -m extract export CHECKPOINT --out model.onnx           # for serving: extract/export.py
    python -m extract model.onnx --backend onnxruntime --input photos/   # the exported model, on the CPU

Files go through data_prep's normalisation (EXIF orientation, RGB, alpha) exactly as training images did,
so boxes are in pixels of the upright image; a file it rejects (corrupt, truncated, not an image) is skipped,
listed at the end and stored in the `skipped` table with its reason. Shard samples are decoded as the
training reader decodes them. Image rows are keyed by the sha256 of the original bytes.

Under torchrun the ranks share the inputs; rank 0 alone writes the database (extract/run.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from extract.database import display_name
from extract.detector import BACKENDS
from extract.export import run_export
from extract.query import parse_query_args, print_rows, run_query
from extract.run import Summary, run_extraction
from train.strategy import setup_strategy


def print_summary(summary: Summary, args: argparse.Namespace) -> None:
    print(f"images: {summary.images} read, {summary.written} new, {summary.already_done} already done, "
          f"{len(summary.skipped)} skipped (on {summary.ranks} rank(s)); {summary.attributes} attributes "
          f"found; database {display_name(args.db)}")
    print(f"annotated images: {summary.annotated} in {args.annotate_dir}")
    for skipped in summary.skipped:
        print(f"  skipped {skipped.source}: {skipped.reason} ({skipped.detail})")



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
    parser = argparse.ArgumentParser(prog="python -m extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by train/main.py (best.pt, ...), or "
                        "with --backend onnxruntime a model written by `python -m extract export`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a folder of images (recursive), a glob pattern or one image file")
    source.add_argument("--manifest", type=Path, help="a data_prep manifest.json; needs --split")
    parser.add_argument("--split", help="the manifest's split to read (train, val, test)")
    parser.add_argument("--db", default="attributes.sqlite", help="SQLite file or postgresql:// URL")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="loader processes per rank")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--max-detections", type=int, default=None,
                        help="per image (default: the checkpoint's eval.max_detections, as it was tested)")
    parser.add_argument("--annotate", type=parse_annotate, default=4,
                        help="draw boxes on the first N images, or 'all' (default 4)")
    parser.add_argument("--annotate-dir", type=Path, default=Path("annotated"))
    parser.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                        help="autocast dtype; auto = bf16 on a GPU, off on the CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="torch: the checkpoint in PyTorch; onnxruntime: an exported model, on the CPU in float32")
    parser.add_argument("--no-colour", dest="colour", action="store_false",
                        help="do not name each detection's dominant colour")
    args = parser.parse_args(argv)
    if args.backend == "onnxruntime":
        if args.device == "cuda" or args.amp == "bf16":
            parser.error("--backend onnxruntime runs on the CPU in float32: it takes no --device cuda or --amp bf16")
        args.device = "cpu"
    if args.manifest is not None and args.split is None:
        parser.error("--manifest needs --split")
    if args.batch_size < 1 or (args.max_detections is not None and args.max_detections < 1) or args.num_workers < 0:
        parser.error("--batch-size and --max-detections must be >= 1, --num-workers >= 0")
    return args



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return run_export(argv[1:])
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

