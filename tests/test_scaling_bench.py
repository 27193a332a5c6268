"""The scaling benchmark's harness on CPU processes: the whole matrix trains for real and the CSV, the
markdown table and the plot are written from the runs' own metrics."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from train.checkpoint import latest_valid_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WARMUP, STEPS, GLOBAL_BATCH = 1, 2, 2


def tiny_model(manifest: Path) -> list[str]:
    return [f"data.manifest={manifest}", "model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
            "model.min_size=96", "model.max_size=128", "model.frozen_batchnorm=false", "data.num_workers=0",
            "wandb.mode=offline"]


def run_bench(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # no GPU (also on a GPU machine: this tests the harness) and one thread per process, as on 2 shared cores
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "bench/scaling.py", "--runs-dir", str(tmp_path / "runs"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bench(small_manifest, module_dir):
    tmp_path = module_dir
    out = tmp_path / "out"
    args = ["--gpus", "2", "--global-batch", str(GLOBAL_BATCH), "--warmup", str(WARMUP),
            "--steps", str(STEPS), "--repeats", "1", "--bench-id", "cpu-test", "--out", str(out)]
    result = run_bench(args + tiny_model(small_manifest), tmp_path)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    with (out / "scaling.csv").open() as file:
        rows = list(csv.DictReader(file))
    return tmp_path / "runs" / "cpu-test", out, rows


def timed_rate(run_dir: Path) -> float:
    """The whole job's images/s over the timed steps, recomputed from the run's per-step records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["kind"] == "train" and r["step"] > WARMUP]
    assert [r["step"] for r in timed] == list(range(WARMUP + 1, WARMUP + STEPS + 1))
    return GLOBAL_BATCH * STEPS / sum(GLOBAL_BATCH / r["images_per_s"] for r in timed)


def test_matrix_runs_at_one_global_batch(bench):
    bench_dir, _, rows = bench
    assert [(row["strategy"], row["devices"]) for row in rows] == [("single", "1"), ("dp", "1"), ("ddp", "2")]
    assert {row["global_batch"] for row in rows} == {str(GLOBAL_BATCH)}
    assert [row["per_device_batch"] for row in rows] == ["2", "2", "1"]
    assert all(row["status"] == "ok" and row["device_type"] == "cpu" for row in rows)
    assert {row["interconnect"] for row in rows} == {"n/a (CPU)"}
    assert latest_valid_checkpoint(bench_dir / "ddp-2" / "r0")[1]["world_size"] == 2
    for name in ("single-1", "dp-1", "ddp-2"):
        run_dir = bench_dir / name / "r0"
        assert float(next(r for r in rows if f"{r['strategy']}-{r['devices']}" == name)["images_per_s"]) == (
            pytest.approx(timed_rate(run_dir), rel=1e-6))
        config = (run_dir / "config.yaml").read_text()
        assert "group: cpu-test" in config and f"name: {name}-r0" in config
        wandb_log = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert b"cpu-test" in wandb_log.read_bytes(), "the wandb run does not carry the bench's group"


def test_speedup_and_efficiency_are_relative_to_single(bench):
    _, _, rows = bench
    single = float(rows[0]["images_per_s"])
    for row in rows:
        speedup = float(row["images_per_s"]) / single
        assert float(row["speedup"]) == pytest.approx(speedup)
        assert float(row["efficiency"]) == pytest.approx(speedup / int(row["devices"]))


def test_markdown_says_cpu_figures_and_plot_is_an_image(bench):
    _, out, rows = bench
    table = (out / "scaling.md").read_text()
    assert "CPU figures" in table and "global batch: 2 images per optimizer step" in table
    assert "DataParallel has no GPUs" in table
    lines = [line for line in table.splitlines() if line.startswith(("| single", "| dp", "| ddp"))]
    assert len(lines) == 3
    assert lines[2].startswith("| ddp | 2 | 2 | 1 |") and f"{float(rows[2]['speedup']):.2f}x" in lines[2]
    image = matplotlib.image.imread(out / "scaling.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_dry_run_plans_the_sweep_and_rejects_an_uneven_batch(small_manifest, tmp_path):
    args = ["--gpus", "3", "--global-batch", "6", "--warmup", "5", "--steps", "20", "--repeats", "1"]
    result = run_bench([*args, "--sweep", "--dry-run", *tiny_model(small_manifest)], tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    overrides = [dict(arg.split("=", 1) for arg in command if "=" in arg and "." in arg.split("=")[0])
                 for command in commands]
    assert [(o["wandb.name"], o["data.batch_size"]) for o in overrides] == [
        ("single-1-r0", "6"), ("dp-1-r0", "6"), ("ddp-1-r0", "6"), ("ddp-2-r0", "3"), ("ddp-3-r0", "2")]
    assert {o["train.log_every"] for o in overrides} == {"5"}  # intervals end at warm-up's end and at 25
    assert {o["train.max_steps"] for o in overrides} == {"25"}
    assert "--nproc-per-node=3" in commands[-1]
    uneven = run_bench(["--gpus", "3", "--global-batch", "4", "--dry-run", *tiny_model(small_manifest)],
                       tmp_path)
    assert uneven.returncode == 2 and "does not split evenly" in uneven.stderr
