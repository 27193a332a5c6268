"""Why CPU bf16 training keeps depthwise convolutions in float32 (train/precision.py): training steps of the main
job's detector in bf16 autocast as it was, with its depthwise convolutions in float32 (what training does now),
and all in float32, side by side; and each depthwise convolution shape of its backbone alone.

    python bench/cpu_depthwise_bf16.py --rounds 12 --processes 2

The model is configs/demo_cpu.yaml's (MobileNet-v3 FPN, 256-320 px, its box head and sampling, channels_last,
AdamW) with random weights, on the synthetic product set's images and boxes (scripts/demo.sh writes them; the
--coco file), 4 images per step as each rank of the main job has. The variants take turns on the same batch,
so machine load hits them alike; each figure is the median over --rounds steps after 2 warm-up rounds, as the
process's CPU time (time.process_time, one torch thread) and as wall time. --processes 2 runs two copies at
once, as the main job's two ranks share the 2 cores (memory bandwidth included); each prints its own table.
Appends the result as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from results import append_result  # noqa: E402

from train.config import load_config  # noqa: E402
from train.model import build_model  # noqa: E402
from train.precision import depthwise_convs_in_float32  # noqa: E402

VARIANTS = ("bf16", "bf16, depthwise float32", "float32")


def coco_batches(coco: Path, batch_size: int, seed: int):
    """Endless batches of (float images, targets with contiguous labels) from a COCO file and its images."""
    data = json.loads(coco.read_text())
    labels = {c["id"]: k + 1 for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    boxes: dict[int, list] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], labels[a["category_id"]]))
    images = [i for i in data["images"] if i["id"] in boxes]
    rng = random.Random(seed)
    while True:
        batch = rng.sample(images, batch_size)
        yield ([pil_to_tensor(Image.open(coco.parent.parent / "images" / i["file_name"]).convert("RGB")).float() / 255
                for i in batch],
               [{"boxes": torch.tensor([b for b, _ in boxes[i["id"]]], dtype=torch.float32),
                 "labels": torch.tensor([label for _, label in boxes[i["id"]]])} for i in batch])


def build_variant(name: str, num_classes: int) -> dict:
    cfg = load_config(ROOT / "configs/demo_cpu.yaml")
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, num_classes, max_detections=cfg.eval.max_detections)
    if name == "bf16, depthwise float32":
        depthwise_convs_in_float32(model)
    model = model.to(memory_format=torch.channels_last).train()
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr),
            "amp": name != "float32", "cpu": [], "wall": []}


def train_step(variant: dict, images, targets) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant["amp"]):
        losses = variant["model"](images, targets)
    variant["optimizer"].zero_grad()
    sum(losses.values()).backward()
    variant["optimizer"].step()
    variant["cpu"].append(time.process_time() - cpu)
    variant["wall"].append(time.perf_counter() - wall)


def depthwise_layers(rounds: int) -> list[dict]:
    """Forward + backward of each depthwise convolution shape of the backbone at 4x256x256, bf16 and float32."""
    cfg = load_config(ROOT / "configs/demo_cpu.yaml")
    model, _ = build_model(cfg.model, 6)
    shapes, hooks = [], []
    for module in model.backbone.body.modules():
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1:
            hooks.append(module.register_forward_hook(
                lambda m, inputs, _: shapes.append((m, tuple(inputs[0].shape)))))
    model.eval()(torch.rand(4, 3, 256, 256).unbind())
    for hook in hooks:  # or every timed call below would add a shape to the list being walked
        hook.remove()
    rows = []
    for conv, shape in shapes:
        conv = conv.to(memory_format=torch.channels_last).train()
        x = torch.randn(shape).to(memory_format=torch.channels_last).requires_grad_()
        times = {}
        for amp in (True, False):
            seconds = []
            for _ in range(rounds):
                start = time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    y = conv(x)
                y.float().sum().backward()
                seconds.append(time.process_time() - start)
            times["bf16" if amp else "float32"] = statistics.median(seconds) * 1000
        rows.append({"input": list(shape), "kernel": conv.kernel_size[0], "stride": conv.stride[0],
                     "bf16_ms": times["bf16"], "float32_ms": times["float32"]})
    return rows


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    batches = coco_batches(args.coco, 4, args.seed)
    variants = {name: build_variant(name, 6) for name in VARIANTS}
    for round_index in range(args.rounds + 2):
        images, targets = next(batches)
        for variant in variants.values():
            train_step(variant, images, targets)
        if round_index < 2:  # warm-up: oneDNN builds its kernels for each new shape
            for variant in variants.values():
                variant["cpu"].clear()
                variant["wall"].clear()
    steps = {name: {"cpu_ms": statistics.median(v["cpu"]) * 1000, "wall_ms": statistics.median(v["wall"]) * 1000}
             for name, v in variants.items()}
    return {"steps": steps, "layers": depthwise_layers(args.rounds)}


def print_tables(result: dict) -> None:
    base = result["steps"]["bf16"]["cpu_ms"]
    print("| training step (4 images) | CPU ms | relative | wall ms |\n| --- | ---: | ---: | ---: |")
    for name, step in result["steps"].items():
        print(f"| {name} | {step['cpu_ms']:.0f} | {step['cpu_ms'] / base:.2f} | {step['wall_ms']:.0f} |")
    print("\n| depthwise conv input, kernel/stride | bf16 ms | float32 ms |\n| --- | ---: | ---: |")
    for row in result["layers"]:
        print(f"| {row['input']}, {row['kernel']}x{row['kernel']}/{row['stride']} | {row['bf16_ms']:.1f} | "
              f"{row['float32_ms']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", type=Path, default=ROOT / "data/synth/raw/annotations/instances.json",
                        help="COCO annotations of the images to train on (default: scripts/demo.sh's)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--processes", type=int, default=1, help="copies run at once (2: as the main job's ranks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/bench_results/cpu_depthwise_bf16.jsonl")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a copy's output to its parent
    args = parser.parse_args(argv)
    copies = [subprocess.Popen([sys.executable, __file__, "--coco", str(args.coco), "--rounds", str(args.rounds),
                                "--seed", str(args.seed + k), "--json"], stdout=subprocess.PIPE, text=True)
              for k in range(1, args.processes)]
    results = [measure(args)] + [json.loads(copy.communicate()[0]) for copy in copies]
    if args.json:
        print(json.dumps(results[0]))
        return 0
    for index, result in enumerate(results):
        print(f"\nprocess {index + 1} of {args.processes}")
        print_tables(result)
    append_result(args.out, {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "rounds": args.rounds,
                             "processes": args.processes, "torch": torch.__version__,
                             "cpu": platform.processor() or platform.machine(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
