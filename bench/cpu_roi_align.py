"""RoIAlign on the CPU: torchvision's kernels against the sparse product CPU training registers
(train/roi_align.py), alone and in a whole training step of the main job's detector.

    python bench/cpu_roi_align.py --rounds 6

Alone: forward and backward of one roi_align call of 256 boxes (the main job's 64 sampled boxes x 4 images per rank) on
256-channel maps of each size the main job's FPN gives a 256-px image, sampling ratio 2, median over --rounds.
In a step: configs/demo_cpu.yaml's model as training runs it on the CPU (bf16 autocast, depthwise convolutions
in float32, channels_last, AdamW), 4 synthetic images per step (scripts/demo.sh writes them), one torch thread;
each in its own process (a registration lasts a process), the two taking turns --rounds times, each turn
timing 4 steps after 2 warm-up steps. Appends the result as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torchvision  # noqa: F401  (defines torch.ops.torchvision)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cpu_depthwise_bf16 import build_variant, coco_batches, train_step  # noqa: E402
from results import append_result  # noqa: E402

from train.roi_align import roi_align_as_sparse_product, use_sparse_roi_align  # noqa: E402

KERNELS = ("torchvision", "sparse")


def alone(rounds: int) -> list[dict]:
    """Milliseconds of one forward and one backward per kernel and feature-map size."""
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(256, 2, generator=generator) * 220
    boxes = torch.cat([corners, corners + 16 + torch.rand(256, 2, generator=generator) * 100], 1)
    rois = torch.cat([torch.randint(0, 4, (256, 1), generator=generator).float(), boxes], 1)
    rows = []
    kernels = {"torchvision": torch.ops.torchvision.roi_align, "sparse": roi_align_as_sparse_product}
    for size in (16, 8, 4):
        features = torch.randn(4, 256, size, size, generator=generator).to(memory_format=torch.channels_last)
        features.requires_grad_()
        grad_output = torch.randn(256, 256, 7, 7, generator=generator)
        row = {"map": list(features.shape)}
        for name, kernel in kernels.items():
            forward, backward = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                output = kernel(features, rois, size / 256, 7, 7, 2, False)
                middle = time.perf_counter()
                output.backward(grad_output)
                forward.append(middle - start)
                backward.append(time.perf_counter() - middle)
            row[f"{name}_forward_ms"] = statistics.median(forward) * 1000
            row[f"{name}_backward_ms"] = statistics.median(backward) * 1000
        rows.append(row)
    return rows


def step_seconds(kernel: str, coco: Path, steps: int) -> list[float]:
    """CPU seconds of `steps` training steps after 2 warm-up ones, with RoIAlign from `kernel`."""
    torch.set_num_threads(1)
    if kernel == "sparse":
        use_sparse_roi_align()
    variant = build_variant("bf16, depthwise float32", 6)  # as CPU training runs the main job's model
    batches = coco_batches(coco, 4, seed=0)
    for _ in range(steps + 2):
        train_step(variant, *next(batches))
    return variant["cpu"][2:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", type=Path, default=ROOT / "data/synth/raw/annotations/instances.json",
                        help="COCO annotations of the images to train on (default: scripts/demo.sh's)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/bench_results/cpu_roi_align.jsonl")
    parser.add_argument("--step-kernel", choices=KERNELS, help=argparse.SUPPRESS)  # one turn, in a child process
    args = parser.parse_args(argv)
    if args.step_kernel:
        print(json.dumps(step_seconds(args.step_kernel, args.coco, steps=4)))
        return 0
    torch.set_num_threads(1)
    rows = alone(args.rounds)
    print("| 256 boxes, 7x7, ratio 2, on map | torchvision forward / backward ms | sparse forward / backward ms |\n"
          "| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['map']} | {row['torchvision_forward_ms']:.1f} / {row['torchvision_backward_ms']:.1f} | "
              f"{row['sparse_forward_ms']:.1f} / {row['sparse_backward_ms']:.1f} |")
    steps = {kernel: [] for kernel in KERNELS}
    for _ in range(args.rounds):
        for kernel in KERNELS:
            turn = subprocess.run([sys.executable, __file__, "--coco", str(args.coco), "--step-kernel", kernel],
                                  check=True, capture_output=True, text=True)
            steps[kernel] += json.loads(turn.stdout.splitlines()[-1])
    medians = {kernel: statistics.median(seconds) * 1000 for kernel, seconds in steps.items()}
    print(f"\ntraining step (4 images, one thread), median CPU ms over {len(steps['sparse'])} steps each: "
          f"torchvision {medians['torchvision']:.0f}, sparse {medians['sparse']:.0f} "
          f"({medians['sparse'] / medians['torchvision']:.2f} of torchvision's)")
    append_result(args.out, {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "rounds": args.rounds,
                             "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                             "alone": rows, "step_ms": medians, "step_seconds": steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
