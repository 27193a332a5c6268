"""`python -m extract query`: read the attributes database from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from extract.database import file_sha256, open_database


def parse_query_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m extract query",
                                     description="Read the attributes database.")
    parser.add_argument("db", help="SQLite file or postgresql:// URL")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="an image file (matched by content) or a stored path / shard key")
    what.add_argument("--attribute", help="images where this attribute (class name) was detected")
    what.add_argument("--counts", action="store_true", help="detections and images per attribute")
    what.add_argument("--colours", action="store_true",
                      help="detections per attribute and colour, with the colour's mean share of the object")
    what.add_argument("--models", action="store_true", help="the registered models")
    what.add_argument("--class-ap", action="store_true",
                      help="per model and class: AP, AP50 and ground truth boxes on the test split")
    what.add_argument("--skipped", action="store_true", help="input files that were skipped, with reasons")
    parser.add_argument("--model", type=int, help="only this model id")
    parser.add_argument("--min-score", type=float, default=0.0, help="with --attribute")
    parser.add_argument("--colour", help="with --attribute: only detections of this colour (red bottles)")
    args = parser.parse_args(argv)
    if args.colour is not None and args.attribute is None:
        parser.error("--colour goes with --attribute NAME")
    return args


def run_query(args: argparse.Namespace) -> list[dict]:
    with open_database(args.db) as db:
        if args.image is not None:
            image = Path(args.image)
            key = file_sha256(image) if image.is_file() else args.image
            return db.attributes_of_image(key, args.model)
        if args.attribute is not None:
            return db.images_with_attribute(args.attribute, args.min_score, args.model, args.colour)
        if args.counts:
            return db.attribute_counts(args.model)
        if args.colours:
            return db.colour_counts(args.model)
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
