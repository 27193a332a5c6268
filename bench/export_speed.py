"""Export for serving: how long `python -m extract export` takes, how big the .onnx file is, and per-image
inference time (medians, the two alternated) and agreement of onnxruntime against PyTorch on the CPU (one image
per forward pass, as extraction's --backend onnxruntime runs it).

    python bench/export_speed.py --model fasterrcnn_mobilenet_v3_large_320_fpn --min-size 320 --max-size 320 \
        --out docs/bench_results/export_speed.jsonl

The checkpoint is a randomly initialised detector for 5 classes in train/main.py's format (weights do not change
the graph, its size or its speed). Images are random 4:3 frames at --image-size; agreement is the largest
difference of scores and boxes over the first --compare detections of each image (box NMS ties of a random
model aside: see tests/test_export.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import append_result

from data_prep.class_list import ClassList
from extract.detector import load_detector
from extract.export import export_onnx
from train.checkpoint import save_checkpoint
from train.config import config_to_dict, load_config
from train.model import build_model


def write_random_checkpoint(name: str, min_size: int, max_size: int, path: Path) -> None:
    classes = ClassList.from_names({1: "bottle", 2: "box", 3: "can", 4: "shoe", 5: "bag"})
    cfg = load_config(None, ["data.manifest=unused", f"model.name={name}", f"model.min_size={min_size}",
                             f"model.max_size={max_size}"])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, classes.num_classes)
    save_checkpoint({"model": model.state_dict(), "categories": classes.to_json(), "config": config_to_dict(cfg),
                     "test_metrics": {"AP": 0.0}}, path)


def per_image_seconds(models: list, images: list[torch.Tensor]) -> tuple[list[float], list[list[dict]]]:
    """Median seconds per image of each model, run in turn on each image (a shared machine's load hits all
    alike), after one warm-up image each."""
    times: list[list[float]] = [[] for _ in models]
    outputs: list[list[dict]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model([images[0]])
        for image in images:
            for index, model in enumerate(models):
                started = time.perf_counter()
                outputs[index].append(model([image])[0])
                times[index].append(time.perf_counter() - started)
    return [statistics.median(seconds) for seconds in times], outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--image-size", type=int, default=640, help="width of the 4:3 test images")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--compare", type=int, default=10, help="detections per image compared")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_results/export_speed.jsonl"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, exported = Path(folder) / "best.pt", Path(folder) / "model.onnx"
        write_random_checkpoint(args.model, args.min_size, args.max_size, checkpoint)
        started = time.perf_counter()
        export_onnx(checkpoint, exported, max_detections=100)
        export_seconds = time.perf_counter() - started
        generator = torch.Generator().manual_seed(1)
        images = [torch.rand(3, args.image_size * 3 // 4, args.image_size, generator=generator)
                  for _ in range(args.images)]
        models = [load_detector(checkpoint, 0.05, 100).model, load_detector(exported, 0.05, 100, "onnxruntime").model]
        (torch_s, onnx_s), (torch_out, onnx_out) = per_image_seconds(models, images)
        size_mb = exported.stat().st_size / 1e6
    first = args.compare
    diffs = (float((a["scores"][:first] - b["scores"][:first]).abs().max())
             for a, b in zip(torch_out, onnx_out, strict=True) if len(a["scores"]) and len(b["scores"]))
    score_diff = max(diffs, default=None)  # None: no image had detections from both
    result = {"model": args.model, "min_size": args.min_size, "max_size": args.max_size,
              "image": f"{args.image_size}x{args.image_size * 3 // 4}", "export_s": round(export_seconds, 1),
              "onnx_mb": round(size_mb, 1), "torch_s_per_image": round(torch_s, 3),
              "onnxruntime_s_per_image": round(onnx_s, 3), "max_score_diff_first": score_diff,
              "detections": [sum(len(out["scores"]) for out in outs) for outs in (torch_out, onnx_out)],
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor()}
    print(result)
    append_result(args.out, result)


if __name__ == "__main__":
    main()
