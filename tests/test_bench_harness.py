"""The one-device training benchmark and the JPEG decoding benchmark, run on the CPU with tiny settings: both
loops train for real, the tables and JSON lines are written, and the ratio is the one of the two rates."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: the bench runs ours and the baseline one after the other on a small shared machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(script: str, args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def last_json_line(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[-1])


def test_gpu_train_bench_runs_both_loops_and_reports_their_ratio(tmp_path):
    out = tmp_path / "results" / "gpu_train.jsonl"
    result = run_script("gpu_train.py", [
        "--device", "cpu", "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--images", "4",
        "--image-size", "96", "--min-size", "96", "--max-size", "128", "--batch-size", "1", "--steps", "2",
        "--warmup", "1", "--amp", "off", "--workers", "0", "--repeats", "1", "--out", str(out),
        "--work-dir", str(tmp_path / "work"),
    ])
    record = last_json_line(out)
    assert record["device"] == "cpu" and record["device_name"].startswith("CPU (")
    assert record["torch"] == torch.__version__
    assert (record["model"], record["images"], record["batch_size"], record["steps"], record["warmup"]) == (
        "fasterrcnn_mobilenet_v3_large_320_fpn", 4, 1, 2, 1)
    ours, baseline = record["ours_images_per_s"], record["baseline_images_per_s"]
    assert ours > 0 and baseline > 0
    assert ours == statistics.median(run["images_per_s"] for run in record["ours_runs"])
    assert baseline == statistics.median(run["images_per_s"] for run in record["baseline_runs"])
    assert record["ratio"] == pytest.approx(ours / baseline, rel=1e-12)
    assert record["target_met"] is None  # CPU figures are not judged against the GPU target

    # ours is the real train/main.py run: its metrics file says the same rate as the table
    metrics_file = tmp_path / "work" / "runs" / "ours-r0" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train_records = [m for m in metrics if m.get("kind") == "train"]
    assert [m["step"] for m in train_records] == [1, 2, 3]  # warm-up, then each timed step (gcd(1, 2) = 1)
    timed_seconds = sum(1 / m["images_per_s"] for m in train_records[1:])  # one image per step
    assert ours == pytest.approx(2 / timed_seconds, rel=1e-12)

    row = next(line for line in result.stdout.splitlines() if line.startswith("| CPU ("))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[-3:] == [f"{ours:.2f}", f"{baseline:.2f}", f"{ours / baseline:.2f}x"]
    assert "not judged, these are CPU figures" in result.stdout


def test_jpeg_bench_rates_and_keeps_up_verdicts(tmp_path):
    out = tmp_path / "jpeg.jsonl"
    out.write_text('{"earlier": "line"}\n')
    result = run_script("jpeg_decode.py", [
        "--images", "8", "--image-size", "96", "--workers", "1", "2", "--repeats", "1", "--train-rate", "200",
        "--real-photos", "--out", str(out),
    ])
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": "line"}  # appended, not overwritten
    record = json.loads(lines[1])
    assert record["gpu"] is None and record["train_rate"] == 200
    assert [s["images"] for s in record["sets"]] == [8, 8]
    synthetic, real = record["sets"]
    assert synthetic["mean_megapixels"] < 0.01 < 0.1 < real["mean_megapixels"]  # 96 px squares vs photos
    for image_set in record["sets"]:
        measured = [(row["decoder"], row["where"], row["workers"]) for row in image_set["rows"]]
        assert measured == [(decoder, where, workers) for decoder in ("PIL", "decode_jpeg")
                            for where, workers in (("CPU, 1 process", 0), ("CPU, worker pool", 1),
                                                   ("CPU, worker pool", 2))]
        for row in image_set["rows"]:
            assert row["images_per_s"] > 0
            assert row["keeps_up"] == (row["images_per_s"] >= 200)
            megapixels = row["images_per_s"] * image_set["mean_megapixels"]
            assert row["megapixels_per_s"] == pytest.approx(megapixels)
    assert "| decode_jpeg | CPU, worker pool | 2 |" in result.stdout
    assert "keeps up with 200 img/s" in result.stdout and "No CUDA device" in result.stdout


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("hflip_prob", [0.0, 1.0])
def test_baseline_targets_follow_the_reference_conversion(hflip_prob):
    """xywh -> xyxy, clamped to the image; crowd and degenerate boxes dropped; labels from category ids."""
    transform = load_bench_module("reference_loop").ReferenceTrainTransform({4: 1, 9: 2}, hflip_prob=hflip_prob)
    image = Image.new("RGB", (100, 60), (10, 20, 30))
    image.putpixel((0, 0), (255, 255, 255))
    annotations = [
        {"bbox": [10, 5, 20, 30], "category_id": 4, "area": 600, "iscrowd": 0},
        {"bbox": [80, 40, 50, 50], "category_id": 9, "area": 2500, "iscrowd": 0},  # runs off the image
        {"bbox": [30, 30, 10, 10], "category_id": 4, "area": 100, "iscrowd": 1},  # crowd
        {"bbox": [50, 10, 0, 10], "category_id": 9, "area": 0, "iscrowd": 0},  # no width
    ]
    tensor, target = transform(image, {"image_id": 7, "annotations": annotations})
    boxes = torch.tensor([[10.0, 5, 30, 35], [80, 40, 100, 60]])
    if hflip_prob:
        boxes = torch.stack([100 - boxes[:, 2], boxes[:, 1], 100 - boxes[:, 0], boxes[:, 3]], 1)
    assert torch.equal(target["boxes"], boxes)
    assert target["labels"].tolist() == [1, 2] and target["image_id"] == 7
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 60, 100)
    corner = tensor[:, 0, 99] if hflip_prob else tensor[:, 0, 0]
    assert corner.tolist() == [1.0, 1.0, 1.0]


def test_convergence_bench_trains_both_loops_per_seed_and_scores_ours_twice(tmp_path):
    out = tmp_path / "convergence.jsonl"
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {name: fasterrcnn_mobilenet_v3_large_320_fpn, min_size: 96, max_size: 128, "
                      "frozen_batchnorm: false,\n"
                      "        builder_kwargs: {box_batch_size_per_image: 16, representation_size: 32}}\n"
                      "optim: {name: adamw, lr: 0.0005, schedule: cosine, warmup_steps: 1}\n")
    result = run_script("convergence.py", [
        "--config", str(config), "--seeds", "0", "1", "--epochs", "1", "--batch-size", "2", "--images", "10",
        "--image-size", "96", "--workers", "0", "--out", str(out), "--work-dir", str(tmp_path / "work"),
    ])
    record = last_json_line(out)
    assert record["seeds"] == [0, 1] and record["optim"]["name"] == "adamw"
    assert record["model"]["builder_kwargs"]["representation_size"] == 32
    for ours, reference in zip(record["ours"], record["reference"], strict=True):
        assert set(ours) == {"AP", "AP50", "AP_by_reference_eval", "AP50_by_reference_eval"}
        assert all(0.0 <= value <= 1.0 for value in [*ours.values(), *reference.values()])
    # ours is a real train/main.py run that took the reference loop's number of steps (full batches only)
    metrics = (tmp_path / "work" / "runs" / "ours-seed1" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in metrics if '"eval"' in line]
    train_images = len(json.loads((tmp_path / "work" / "data" / "train.json").read_text())["images"])
    assert [(e["split"], e["step"]) for e in evals] == [("val", train_images // 2)]
    assert "| mean ± sd (min-max) |" in result.stdout
