"""What naming colours adds to extraction: the extraction step with and without colour, side by side.

    python bench/colour_overhead.py --images 64 --detections 2 10 100 --repeats 5

Times extract/run.py's per-batch work (`rank_steps`: the forward pass, the detections, and with colour
extract/colour.py's `add_colours`) over synthetic images decoded in memory (no file reads, no database),
for the main job's detector (configs/demo_cpu.yaml: MobileNet-v3 FPN at 256-320 px, the model that makes
colour's share the largest, being the cheapest) with random weights. The score threshold is 0 and the per-image
cap is each --detections value, so every image has exactly that many detections (the main job's detector
keeps about 2 per image at its threshold of 0.5; 100 is extraction's default cap). Runs with and without
colour alternate, so machine load hits both alike; each figure is the median of --repeats passes. Times are
the process's CPU time per image (time.process_time, one torch thread): on a shared machine the wall time of a
pass depends on what else runs (it is printed too), the CPU work of this process much less. The difference of
two passes is still noisy by a few percent, so the colour step is also timed on its own (`add_colours` on the
same images and detections, the third column), which is the figure to compare with the step without colour.
Prints a markdown table and appends the result as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchvision.io import read_image  # noqa: E402

from bench.results import append_result  # noqa: E402
from data_prep.class_list import ClassList  # noqa: E402
from data_prep.synth import CATEGORIES, write_synthetic_coco  # noqa: E402
from extract.colour import add_colours  # noqa: E402
from extract.detector import Detector, limit_detections  # noqa: E402
from extract.inputs import Loaded  # noqa: E402
from extract.run import RunOptions, rank_steps  # noqa: E402
from train.config import load_config  # noqa: E402
from train.model import build_model  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="extraction's default")
    parser.add_argument("--detections", type=int, nargs="+", default=[2, 10, 100], help="per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a torchrun worker has 1)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo_cpu.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_results" / "colour_overhead.jsonl")
    return parser.parse_args(argv)


def synthetic_images(count: int, size: int) -> list[Loaded]:
    with tempfile.TemporaryDirectory(prefix="colour_overhead_") as root:
        write_synthetic_coco(root, num_images=count, image_size=size, seed=0)
        files = sorted(Path(root, "images").glob("*.jpg"))
        return [Loaded(index, file.name, read_image(str(file)), sha256=f"{index:064d}")
                for index, file in enumerate(files)]


def seconds_per_image(detector: Detector, images: list[Loaded], batch_size: int, colour: bool,
                      detections: int) -> tuple[float, float, list]:
    """(CPU seconds, wall seconds) per image of extraction's per-batch work, and the detections per image."""
    options = RunOptions(score_threshold=0.0, max_detections=detections, annotate_limit=0,
                         annotate_dir=Path("unused"), amp_dtype=None, colour=colour)
    batches = [images[start:start + batch_size] for start in range(0, len(images), batch_size)]
    cpu, wall = time.process_time(), time.perf_counter()
    found = [extraction.detections for step in rank_steps(detector, batches, set(), torch.device("cpu"), options)
             for extraction in step.extractions]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if sum(map(len, found)) != detections * len(images):
        raise SystemExit(f"expected {detections} detections per image, got {sum(map(len, found)) / len(images)}")
    return cpu / len(images), wall / len(images), found


def colour_seconds_per_image(images: list[Loaded], found: list) -> float:
    """CPU seconds per image of add_colours alone, on these images' detections."""
    cpu = time.process_time()
    for item, detections in zip(images, found, strict=True):
        add_colours(item.image, detections)
    return (time.process_time() - cpu) / len(images)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, len(CATEGORIES) + 1)
    classes = ClassList.from_names({category["id"]: category["name"] for category in CATEGORIES})
    detector = Detector(model.eval(), cfg.model.name, classes, None, {})
    images = synthetic_images(args.images, args.image_size)
    rows = []
    print("| detections per image | CPU ms/image without colour | with colour | colour alone | colour / without "
          "| wall ms/image without | with |")
    print("|---|---|---|---|---|---|---|")
    for detections in args.detections:
        limit_detections(model, 0.0, detections)
        seconds_per_image(detector, images[: args.batch_size], args.batch_size, True, detections)  # warm-up
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        colour_alone = []
        for _ in range(args.repeats):
            for colour in (False, True):
                cpu, wall, found = seconds_per_image(detector, images, args.batch_size, colour, detections)
                times[colour].append((cpu, wall))
            colour_alone.append(colour_seconds_per_image(images, found))
        (cpu_without, wall_without), (cpu_with, wall_with) = (
            [1000 * statistics.median(pass_[kind] for pass_ in times[flag]) for kind in (0, 1)]
            for flag in (False, True))
        alone = 1000 * statistics.median(colour_alone)
        rows.append({"detections": detections, "cpu_ms_without": cpu_without, "cpu_ms_with": cpu_with,
                     "cpu_ms_colour_alone": alone, "colour_over_without": alone / cpu_without,
                     "wall_ms_without": wall_without, "wall_ms_with": wall_with,
                     "passes": {str(k): v for k, v in times.items()}, "colour_alone_passes": colour_alone})
        print(f"| {detections} | {cpu_without:.1f} | {cpu_with:.1f} | {alone:.2f} | {100 * alone / cpu_without:.1f}% "
              f"| {wall_without:.1f} | {wall_with:.1f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    append_result(args.out, {
        "bench": "colour_overhead", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(), "machine": platform.machine(), "model": cfg.model.name,
        "arguments": {key: str(value) for key, value in vars(args).items()}, "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
