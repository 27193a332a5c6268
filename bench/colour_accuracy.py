"""Colour naming against ground truth: extract/colour.py on the ground-truth boxes of the synthetic test split.

    python bench/colour_accuracy.py --images 2000 --image-size 256

Renders a synthetic set (data_prep.synth, seed --seed), shards it with data_prep (so the colours come through
the shards' annotation `attributes`, as a user's data set's would), and names the colour of every box of the
split --split from the image and the box alone. A box is right when the name equals the one synth recorded
(the product's main colour: body, box front, shoe upper). Prints the accuracy, per class and overall, and the
confusion between colour names (rows: recorded, columns: named), and appends the result as one JSON line to
--out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402

from bench.results import append_result  # noqa: E402
from common.colour_palette import COLOUR_NAMES  # noqa: E402
from data_prep.__main__ import main as data_prep_main  # noqa: E402
from data_prep.manifest import shard_paths  # noqa: E402
from data_prep.synth import CATEGORIES, write_synthetic_coco  # noqa: E402
from extract.colour import dominant_colours  # noqa: E402
from train.shard_reader import iter_raw_samples  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="synthetic images to render")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", default="train=0.8,val=0.1,test=0.1", help="data_prep's --splits")
    parser.add_argument("--split", default="test", help="the split whose boxes are named")
    parser.add_argument("--workers", type=int, default=2, help="rendering and sharding processes")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_results" / "colour_accuracy.jsonl")
    return parser.parse_args(argv)


def synthetic_manifest(root: Path, args: argparse.Namespace) -> Path:
    annotations = write_synthetic_coco(root / "synth", num_images=args.images, image_size=args.image_size,
                                       seed=args.seed, num_workers=args.workers)
    out = root / "shards"
    code = data_prep_main(["shard", "--input", f"{annotations}:{root / 'synth' / 'images'}", "--out", str(out),
                           "--splits", args.splits, "--num-workers", str(args.workers), "--seed", str(args.seed)])
    if code != 0:
        raise SystemExit(f"data_prep shard failed with exit code {code}")
    return out / "manifest.json"


def name_split(manifest: Path, split: str) -> tuple[list[tuple[str, str, str]], float]:
    """(class name, recorded colour, named colour) of every box of the split, and the seconds spent naming."""
    class_of = {category["id"]: category["name"] for category in CATEGORIES}
    rows, seconds = [], 0.0
    for shard in shard_paths(manifest, split):
        for sample in iter_raw_samples(shard):
            meta = json.loads(sample["json"])
            if not meta["annotations"]:
                continue
            image = decode_jpeg(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8),
                                mode=ImageReadMode.RGB)
            boxes = torch.tensor([annotation["bbox"] for annotation in meta["annotations"]])
            start = time.perf_counter()
            named = dominant_colours(image, boxes)
            seconds += time.perf_counter() - start
            rows += [(class_of[annotation["category_id"]], annotation["attributes"]["colour"], colour.name)
                     for annotation, colour in zip(meta["annotations"], named, strict=True)]
    return rows, seconds


def confusion_table(rows: list[tuple[str, str, str]]) -> str:
    """Markdown: recorded colour per row, named colour per column, counts (blank for 0)."""
    counts = Counter((truth, named) for _, truth, named in rows)
    seen = [name for name in COLOUR_NAMES if any(name in pair for pair in counts)]
    lines = ["| recorded \\ named | " + " | ".join(seen) + " | right |",
             "|---" * (len(seen) + 2) + "|"]
    for truth in seen:
        total = sum(counts[(truth, named)] for named in seen)
        if total:
            cells = [str(counts[(truth, named)] or "") for named in seen]
            lines.append(f"| {truth} | " + " | ".join(cells) + f" | {counts[(truth, truth)] / total:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="colour_accuracy_") as root:
        manifest = synthetic_manifest(Path(root), args)
        rows, seconds = name_split(manifest, args.split)
    if not rows:
        raise SystemExit(f"split {args.split} holds no boxes; render more --images")
    right = Counter(cls for cls, truth, named in rows if truth == named)
    boxes = Counter(cls for cls, _, _ in rows)
    accuracy = sum(right.values()) / len(rows)
    per_class = {cls: right[cls] / boxes[cls] for cls in sorted(boxes)}
    print(f"colour accuracy on the {args.split} split's ground-truth boxes: {accuracy:.3f} "
          f"({sum(right.values())} of {len(rows)}); {1000 * seconds / len(rows):.2f} ms per box, one thread")
    print("per class: " + ", ".join(f"{cls} {value:.3f} ({boxes[cls]})" for cls, value in per_class.items()))
    print(confusion_table(rows))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    append_result(args.out, {
        "bench": "colour_accuracy", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(), "machine": platform.machine(), "arguments": vars(args) | {"out": None},
        "boxes": len(rows), "accuracy": accuracy, "per_class": per_class, "ms_per_box": 1000 * seconds / len(rows),
        "confusion": [[truth, named, count] for (truth, named), count in
                      sorted(Counter((t, n) for _, t, n in rows).items())],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
