"""How well a detector's anchors fit a split's boxes: each box's best IoU with any anchor, at the size the model
resizes the image to, for the main job's models (docs/benchmarks.md, "Feature strides and anchors").

    python bench/anchor_fit.py                 # the main job's train split (bash scripts/demo.sh makes it)

Prints the boxes' sizes (square root of the area, in the model's input pixels), each model's feature strides and
anchor sizes, and per model the mean best IoU, the share of boxes with a best IoU of at least 0.7 and 0.5 (the
RPN's positive and negative thresholds are 0.7 and 0.3), and the same for boxes under 32 px. Anchors are laid
on one canvas as large as the largest resized image, which holds every image's anchor grid (they start at
the origin). Appends the result as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from results import append_result  # noqa: E402

from train.config import load_config  # noqa: E402
from train.model import build_model  # noqa: E402
from train.shard_reader import ShardBatches, split_shards  # noqa: E402

MODELS = {
    "torchvision's 320 FPN": ["model.name=fasterrcnn_mobilenet_v3_large_320_fpn"],
    "torchvision's 320 FPN, per-map anchor sizes": [
        "model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
        "model.builder_kwargs.anchor_sizes=[[16,24,32,48,64],[64,96,128,160,192],[128,160,192,256,320]]"],
    "stride-16 FPN (the main job's)": ["model.name=fasterrcnn_mobilenet_v3_large_stride16_fpn"],
}


def resized_boxes(manifest: Path, split: str, min_size: int, max_size: int) -> tuple[torch.Tensor, int]:
    """Every box of the split in the model's input pixels, and the largest resized image side."""
    boxes, largest = [], 0
    for images, targets in ShardBatches(split_shards(manifest, split), batch_size=32, seed=0, epoch=0,
                                        training=False):
        for image, target in zip(images, targets, strict=True):
            height, width = image.shape[-2:]
            scale = min(min_size / min(height, width), max_size / max(height, width))
            boxes.append(target["boxes"] * scale)
            largest = max(largest, round(max(height, width) * scale))
    return torch.cat(boxes), largest


def anchors_of(overrides: list[str], canvas: int) -> tuple[torch.Tensor, list[int], list]:
    """The model's anchors over a canvas x canvas image, its feature strides and its anchor sizes."""
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", overrides)
    model, _ = build_model(cfg.model, 6)
    model.eval()
    with torch.no_grad():
        features = list(model.backbone(torch.zeros(1, 3, canvas, canvas)).values())
    generator = model.rpn.anchor_generator
    anchors = generator(ImageList(torch.zeros(1, 3, canvas, canvas), [(canvas, canvas)]), features)[0]
    strides = [canvas // feature.shape[-1] for feature in features]
    return anchors, strides, [list(sizes) for sizes in generator.sizes]


def fit(boxes: torch.Tensor, anchors: torch.Tensor) -> dict:
    best = box_iou(boxes, anchors).max(dim=1).values
    small = best[(boxes[:, 2:] - boxes[:, :2]).prod(dim=1).sqrt() < 32]
    return {"mean_best_iou": best.mean().item(), "share_iou_0.7": (best >= 0.7).float().mean().item(),
            "share_iou_0.5": (best >= 0.5).float().mean().item(), "small_boxes": len(small),
            "small_mean_best_iou": small.mean().item(), "small_share_iou_0.5": (small >= 0.5).float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=ROOT / "data/synth/shards/manifest.json")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/bench_results/anchor_fit.jsonl")
    args = parser.parse_args(argv)
    cfg = load_config(ROOT / "configs/demo_cpu.yaml")
    boxes, canvas = resized_boxes(args.manifest, args.split, cfg.model.min_size, cfg.model.max_size)
    sides = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).sqrt()
    quantiles = torch.quantile(sides, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
    print(f"{len(boxes)} {args.split} boxes; sqrt(area) 10/25/50/75/90th percentile: "
          f"{' / '.join(f'{q:.0f}' for q in quantiles)} px")
    print("| model | strides | anchor sizes | mean best IoU | >= 0.7 | >= 0.5 | under 32 px: mean, >= 0.5 |\n"
          "| --- | --- | --- | ---: | ---: | ---: | --- |")
    rows = []
    for name, overrides in MODELS.items():
        anchors, strides, sizes = anchors_of(overrides, canvas)
        row = {"model": name, "strides": strides, "anchor_sizes": sizes, **fit(boxes, anchors)}
        rows.append(row)
        print(f"| {name} | {strides} | {sizes} | {row['mean_best_iou']:.3f} | {row['share_iou_0.7']:.0%} | "
              f"{row['share_iou_0.5']:.0%} | {row['small_mean_best_iou']:.3f}, {row['small_share_iou_0.5']:.0%} |")
    append_result(args.out, {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "split": args.split,
                             "boxes": len(boxes), "sqrt_area_quantiles": quantiles, "canvas": canvas,
                             "cpu": platform.processor() or platform.machine(), "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
