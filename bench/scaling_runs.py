"""One case of the scaling matrix: its training runs, and the images/s each one measured.

A case is a strategy over a number of devices; each repeat is a real train/main.py job (bench/scaling.py says
which overrides and why) whose throughput is read back from its own metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.torchrun import TRAIN_SCRIPT, standalone_command
from train.config import Config
from train.metrics import METRICS_FILE_NAME
from train.readers import steps_per_epoch
from train.shard_reader import split_shards


@dataclass(frozen=True)
class Case:
    """One cell of the matrix. `devices`: GPUs the run uses (CPU processes under ddp without GPUs)."""

    strategy: str
    devices: int

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.devices}"

    @property
    def processes(self) -> int:
        return self.devices if self.strategy == "ddp" else 1


@dataclass
class Result:
    case: Case
    per_device_batch: int
    threads_per_process: int
    rates: list[float] = field(default_factory=list)  # images/s of each repeat
    data_wait_shares: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    crosses_epoch_end: bool = False
    failure: str | None = None

    @property
    def images_per_s(self) -> float | None:
        return statistics.median(self.rates) if self.rates and self.failure is None else None


@dataclass
class Settings:
    """What every run of one benchmark shares."""

    train_args: list[str]  # --config and the user's overrides
    cfg: Config
    gpus: int
    global_batch: int
    warmup: int
    steps: int
    repeats: int
    gpu_ids: list[str]  # the GPUs the runs use; empty on a machine without GPUs
    bench_id: str
    bench_dir: Path

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpu_ids)


def log_every(warmup: int, steps: int) -> int:
    """The largest logging interval whose boundaries fall on both the end of warm-up and the last step, so
    that the timed steps are exactly a whole number of logged intervals."""
    return math.gcd(warmup, steps) if warmup else steps


def epochs_needed(cfg: Config, case: Case, global_batch: int, total_steps: int) -> int:
    """Epochs that hold warm-up + timed steps; more than one puts an epoch end (a checkpoint, a new loader)
    inside the timed window."""
    loader_batch = global_batch // case.processes  # dp loads the whole global batch in its one process
    epoch_steps = steps_per_epoch(split_shards(cfg.data.manifest, cfg.data.train_split), world_size=case.processes,
                                  loader_batch_size=loader_batch, accumulate_steps=1)
    return -(-total_steps // max(1, epoch_steps))


def run_overrides(settings: Settings, case: Case, epochs: int, run_dir: Path, repeat: int) -> list[str]:
    """The bench's overrides, given after the user's so they win."""
    return [
        f"run_dir={run_dir}",
        f"strategy={case.strategy}",
        f"device={'cuda' if settings.on_gpu else 'cpu'}",
        f"data.batch_size={settings.global_batch // case.devices}",
        "optim.accumulate_steps=1",
        f"train.epochs={epochs}",
        f"train.max_steps={settings.warmup + settings.steps}",
        f"train.throughput_warmup_steps={settings.warmup}",
        f"train.log_every={log_every(settings.warmup, settings.steps)}",
        "eval.every_epochs=0",
        "eval.test_at_end=false",
        "checkpoint.every_steps=0",
        f"wandb.group={settings.bench_id}",
        f"wandb.name={case.name}-r{repeat}",
    ]


def run_command(case: Case, train_args: list[str]) -> list[str]:
    if case.strategy == "ddp":
        return standalone_command(case.processes, 0, train_args)
    return [sys.executable, TRAIN_SCRIPT, *train_args]


def run_environment(case: Case, gpu_ids: list[str], threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids[: case.devices])
    return env


def timed_window(
    run_dir: Path, warmup: int, steps: int, global_batch: int
) -> tuple[float, float, float | None]:
    """(images/s, data-wait share, peak MB) over the timed steps, from the run's metrics.jsonl.

    Each logged interval after warm-up covers the same number of steps; its images/s (summed over ranks)
    gives its duration, so the window's rate is all timed images over the summed durations, and the
    data-wait share is the wall-time-weighted mean (rank 0's). Peak memory is rank 0's
    torch.cuda.max_memory_allocated. Raises RuntimeError when the records do not cover the timed steps.
    """
    path = run_dir / METRICS_FILE_NAME
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    timed = [r for r in records if r.get("kind") == "train" and warmup < r["step"] <= warmup + steps]
    interval = log_every(warmup, steps)
    if [r["step"] for r in timed] != list(range(warmup + interval, warmup + steps + 1, interval)):
        raise RuntimeError(
            f"{path}: expected train records at every {interval} steps after step {warmup} up "
            f"to {warmup + steps}, got steps {[r['step'] for r in timed]}"
        )
    missing = [r["step"] for r in timed if "images_per_s" not in r]
    if missing:
        raise RuntimeError(f"{path}: no images_per_s in the train records of steps {missing}")
    durations = [global_batch * interval / r["images_per_s"] for r in timed]
    walls = [r["step_time_s"] * interval for r in timed]
    rate = global_batch * steps / sum(durations)
    data_wait = sum(r["data_wait_share"] * wall for r, wall in zip(timed, walls, strict=True)) / sum(walls)
    peaks = [r["max_memory_allocated_mb"] for r in timed if "max_memory_allocated_mb" in r]
    return rate, data_wait, max(peaks) if peaks else None


def run_case(settings: Settings, case: Case, epochs: int, dry_run: bool) -> Result:
    """All repeats of one case, each a fresh training job; stops at the first failed repeat."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // case.processes))
    result = Result(case, settings.global_batch // case.devices, threads, crosses_epoch_end=epochs > 1)
    env = run_environment(case, settings.gpu_ids, threads)
    for repeat in range(settings.repeats):
        run_dir = settings.bench_dir / case.name / f"r{repeat}"
        command = run_command(
            case, settings.train_args + run_overrides(settings, case, epochs, run_dir, repeat)
        )
        if dry_run:
            visible = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " if settings.on_gpu else ""
            print(f"{visible}OMP_NUM_THREADS={threads} {shlex.join(command)}")
            continue
        run_dir.mkdir(parents=True)
        log_path = run_dir.parent / f"r{repeat}.log"
        print(
            f"{case.name} repeat {repeat + 1}/{settings.repeats} (log: {log_path}) ...", end=" ", flush=True
        )
        with log_path.open("w") as log:
            returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        try:
            if returncode != 0:
                raise RuntimeError(f"exit {returncode}, see {log_path}")
            window = timed_window(run_dir, settings.warmup, settings.steps, settings.global_batch)
        except (RuntimeError, OSError) as error:  # the run failed, or its metrics do not cover the window
            result.failure = str(error)
            print(f"FAILED: {result.failure}", flush=True)
            break
        rate, data_wait, peak = window
        result.rates.append(rate)
        result.data_wait_shares.append(data_wait)
        if peak is not None:
            result.peak_memory_mb = max(peak, result.peak_memory_mb or 0.0)
        print(f"{rate:.2f} images/s", flush=True)
    return result
