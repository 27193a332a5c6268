"""Scaling benchmark: one training config under one device, DataParallel and DDP, at the same global batch.

    python bench/scaling.py --config configs/coco2000.yaml --gpus 2 --steps 20 --warmup 5 --repeats 3 \\
        --global-batch 8 --out docs/scaling/ [--sweep] [dotted.key=value ...]

The matrix: `single` (one device, data.batch_size = global batch), `dp` (DataParallel over N GPUs in one
process, N x global/N images per step), `ddp` (N processes under torchrun, global/N images each) and, with
--sweep, DDP over every count from 1 to N. Each run is a real train/main.py job in its own run directory
(runs/scaling/<bench id>/<case>/r<k>) with evaluation off, a checkpoint only at the end, and wandb group =
the bench id, so the runs sit side by side there. images/s covers the timed steps only (after --warmup
steps) and ends on a device synchronisation (train/metrics.py); each case is repeated and the median kept.

Writes to --out: scaling.csv, scaling.md (the table with the hardware and the set-up), scaling.png (images/s
against device count with the ideal linear line) and, where nvidia-smi exists, topology.txt.

Without GPUs the same matrix runs on CPU processes (gloo) to test the harness: the figures are CPU figures,
DataParallel just calls the module (one "device") and --gpus is the number of DDP processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pynvml
import torch

from launch.torchrun import TRAIN_SCRIPT, standalone_command
from train.config import Config, load_config
from train.metrics import METRICS_FILE_NAME
from train.shard_reader import samples_per_rank, split_shards

STRATEGIES = ("single", "dp", "ddp")
EPOCH_END_CAUTION = ("the timed steps cross an epoch end, so a checkpoint and a new loader are timed; use "
                     "fewer steps or a larger training split")
CSV_COLUMNS = (
    "strategy", "devices", "device_type", "global_batch", "per_device_batch", "images_per_s",
    "images_per_s_repeats", "speedup", "efficiency", "data_wait_share", "peak_memory_mb",
    "threads_per_process", "device_names", "driver", "interconnect", "status",
)


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


def plan_cases(gpus: int, on_gpu: bool, sweep: bool) -> list[Case]:
    """single, dp and ddp over `gpus` devices; with sweep, ddp over 1..gpus. DataParallel on the CPU has no
    devices to split over and runs the module once, so it counts as one device there."""
    ddp_counts = range(1, gpus + 1) if sweep else [gpus]
    return [Case("single", 1), Case("dp", gpus if on_gpu else 1), *(Case("ddp", n) for n in ddp_counts)]


def check_divisible(global_batch: int, cases: Sequence[Case]) -> None:
    for case in cases:
        if global_batch % case.devices:
            raise ValueError(
                f"--global-batch {global_batch} does not split evenly over the {case.devices} devices of "
                f"{case.name}: the comparison needs the same global batch everywhere; pick a multiple of "
                "every device count"
            )


def log_every(warmup: int, steps: int) -> int:
    """The largest logging interval whose boundaries fall on both the end of warm-up and the last step, so
    that the timed steps are exactly a whole number of logged intervals."""
    return math.gcd(warmup, steps) if warmup else steps


# ---- one run ------------------------------------------------------------------------------------------
def epochs_needed(cfg: Config, case: Case, global_batch: int, total_steps: int) -> int:
    """Epochs that hold warm-up + timed steps; more than one puts an epoch end (a checkpoint, a new loader)
    inside the timed window."""
    loader_batch = global_batch // case.processes  # dp loads the whole global batch in its one process
    shards = split_shards(cfg.data.manifest, cfg.data.train_split)
    samples = samples_per_rank(shards, rank=0, world_size=case.processes, training=True)
    return -(-total_steps // max(1, -(-samples // loader_batch)))


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


# ---- the hardware -------------------------------------------------------------------------------------
def hardware_facts(gpu_ids: list[str], out: Path) -> dict[str, str]:
    """GPU names, driver and how the GPUs talk (NVLink links, peer-to-peer access); "n/a (CPU)" without
    GPUs.

    NVML numbers GPUs by PCI bus; the runs set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA's indices agree. Where
    nvidia-smi exists, its `topo -m` matrix (PCIe switches, NUMA affinity) goes to out/topology.txt.
    """
    if not gpu_ids:
        cpu = platform.processor() or platform.machine()
        return {
            "device_names": f"n/a (CPU: {os.cpu_count()} cores, {cpu})",
            "driver": "n/a (CPU)",
            "interconnect": "n/a (CPU)",
        }
    pynvml.nvmlInit()
    try:
        handles = [
            pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
            if gpu.isdigit()
            else pynvml.nvmlDeviceGetHandleByUUID(gpu)
            for gpu in gpu_ids
        ]
        names = [str(pynvml.nvmlDeviceGetName(handle)) for handle in handles]
        driver = str(pynvml.nvmlSystemGetDriverVersion())
        links = [_active_nvlinks(handle) for handle in handles]
    finally:
        pynvml.nvmlShutdown()
    pairs = [(a, b) for a in range(len(gpu_ids)) for b in range(len(gpu_ids)) if a != b]
    peer = [torch.cuda.can_device_access_peer(a, b) for a, b in pairs]
    if not pairs:
        peer_text = "n/a (one GPU)"
    elif all(peer) or not any(peer):
        peer_text = "yes" if all(peer) else "no"
    else:
        peer_text = ", ".join(
            f"{a}->{b} {'yes' if ok else 'no'}" for (a, b), ok in zip(pairs, peer, strict=True)
        )
    link_text = "PCIe (no active NVLink)"
    if any(links):
        per_gpu = ", ".join(f"GPU{i}: {n} active links" for i, n in zip(gpu_ids, links, strict=True))
        link_text = f"NVLink ({per_gpu})"
    if shutil.which("nvidia-smi"):
        topology = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=60)
        (out / "topology.txt").write_text(topology.stdout + topology.stderr)
    return {
        "device_names": "; ".join(f"GPU{i}: {name}" for i, name in zip(gpu_ids, names, strict=True)),
        "driver": driver,
        "interconnect": f"{link_text}; peer-to-peer access: {peer_text}",
    }


def _active_nvlinks(handle) -> int:
    active = 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            active += pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
        except pynvml.NVMLError:  # no such link, or no NVLink at all (GeForce cards such as the RTX 4090)
            break
    return active


# ---- outputs ------------------------------------------------------------------------------------------
def table_rows(
    results: Sequence[Result], global_batch: int, on_gpu: bool, facts: dict[str, str]
) -> list[dict]:
    """Speed-up = images/s / single's images/s; efficiency = speed-up / devices."""
    single = next((r.images_per_s for r in results if r.case.strategy == "single"), None)
    rows = []
    for result in results:
        rate = result.images_per_s
        speedup = rate / single if rate is not None and single else None
        rows.append(
            {
                "strategy": result.case.strategy,
                "devices": result.case.devices,
                "device_type": "cuda" if on_gpu else "cpu",
                "global_batch": global_batch,
                "per_device_batch": result.per_device_batch,
                "images_per_s": rate,
                "images_per_s_repeats": ";".join(f"{value:.4f}" for value in result.rates),
                "speedup": speedup,
                "efficiency": speedup / result.case.devices if speedup is not None else None,
                "data_wait_share": statistics.median(result.data_wait_shares)
                if result.data_wait_shares
                else None,
                "peak_memory_mb": result.peak_memory_mb,
                "threads_per_process": result.threads_per_process,
                **facts,
                "status": result.failure or "ok",
            }
        )
    return rows


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})


def _cell(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def write_markdown(rows: Sequence[dict], path: Path, setup: dict[str, str], on_gpu: bool) -> None:
    unit = "GPUs" if on_gpu else "CPU devices"
    lines = ["# Scaling benchmark", ""]
    if not on_gpu:
        lines += [
            "**CPU figures.** No GPU was visible: the matrix ran on CPU processes (DDP over gloo) to test "
            "the harness. They say nothing about GPU scaling; run the same command on a GPU machine for "
            "those.",
            "",
        ]
    lines += [f"- {key}: {value}" for key, value in setup.items()]
    lines += [
        "",
        f"| strategy | {unit} | global batch | per-device batch | images/s | speed-up | scaling efficiency "
        "| data-wait share | peak memory per GPU (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        rate = _cell(row["images_per_s"]) if row["status"] == "ok" else f"failed: {row['status']}"
        memory = "n/a (CPU)" if not on_gpu else _cell(row["peak_memory_mb"], 0)
        share = None if row["data_wait_share"] is None else 100 * row["data_wait_share"]
        efficiency = None if row["efficiency"] is None else 100 * row["efficiency"]
        lines.append(
            f"| {row['strategy']} | {row['devices']} | {row['global_batch']} | {row['per_device_batch']} "
            f"| {rate} | {_cell(row['speedup'], 2, 'x')} | {_cell(efficiency, 0, '%')} "
            f"| {_cell(share, 1, '%')} | {memory} |"
        )
    lines += [
        "",
        "Notes:",
        "- images/s: the whole job's images per second over the timed steps only (warm-up excluded; the "
        "window ends on a device synchronisation), the median of the repeats (all repeats in scaling.csv).",
        "- speed-up = images/s / images/s of `single`; scaling efficiency = speed-up / devices. The global "
        "batch is the same in every row, so this is strong scaling.",
        "- data-wait share: the part of rank 0's timed wall time spent waiting for the data loader.",
        "- peak memory: torch.cuda.max_memory_allocated on rank 0 (GPU 0 under DataParallel, which also "
        "gathers the outputs), the largest over the repeats.",
    ]
    if not on_gpu:
        lines.append(
            "- `dp` on the CPU: DataParallel has no GPUs to split the batch over and just calls the "
            "module, so it counts as one device and measures the wrapper's overhead only."
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: Sequence[dict], path: Path, on_gpu: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    measured = [row for row in rows if row["images_per_s"] is not None]
    single = next((row["images_per_s"] for row in measured if row["strategy"] == "single"), None)
    most = max(row["devices"] for row in rows)
    if single is not None:
        axes.plot([1, most], [single, single * most], "k--", label="ideal linear (single x devices)")
    for strategy, marker in zip(STRATEGIES, "os^", strict=True):
        points = sorted(
            (row["devices"], row["images_per_s"]) for row in measured if row["strategy"] == strategy
        )
        if points:
            axes.plot(*zip(*points, strict=True), marker=marker, label=strategy)
    axes.set_xlabel("GPUs" if on_gpu else "CPU processes (ddp) / devices")
    axes.set_ylabel("images/s (timed steps, median)")
    axes.set_xticks(range(1, most + 1))
    axes.set_title("Scaling at a fixed global batch" + ("" if on_gpu else " (CPU figures)"))
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # nothing to label when every case failed
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- the command line ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="training config (YAML); the runs use it as they would in training")
    parser.add_argument(
        "--gpus",
        type=int,
        help="N: GPUs for dp and ddp (default: all visible); without GPUs, DDP CPU processes (default 2)",
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        help="images per optimizer step in every run (default: data.batch_size x N)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per case; the median is kept (default 3)"
    )
    parser.add_argument("--sweep", action="store_true", help="also DDP over every device count from 1 to N")
    parser.add_argument(
        "--out", type=Path, default=Path("docs/scaling"), help="where the CSV, table, plot go"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs/scaling"),
        help="run directories go to RUNS_DIR/BENCH_ID/CASE/rK",
    )
    parser.add_argument(
        "--bench-id", help="names the run directories and the wandb group (default: timestamp)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print each run's command and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for every run")
    args = parser.parse_args(argv)
    for name in ("gpus", "global_batch", "steps", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


def visible_gpu_ids() -> list[str]:
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [index.strip() for index in listed.split(",") if index.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Everything the runs share, checked before the first run; raises ValueError with the reason."""
    # before CUDA starts, so that CUDA's device indices are NVML's (see hardware_facts)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    gpu_ids = visible_gpu_ids()
    cfg = load_config(args.config, args.overrides)  # a bad override fails here, before any run
    gpus = args.gpus or (len(gpu_ids) if gpu_ids else 2)
    if gpu_ids and gpus > len(gpu_ids):
        raise ValueError(f"--gpus {gpus}: only {len(gpu_ids)} GPUs are visible ({','.join(gpu_ids)})")
    bench_id = args.bench_id or time.strftime("scaling-%Y%m%d-%H%M%S")
    return Settings(
        train_args=(["--config", args.config] if args.config else []) + list(args.overrides),
        cfg=cfg,
        gpus=gpus,
        global_batch=args.global_batch or cfg.data.batch_size * gpus,
        warmup=args.warmup,
        steps=args.steps,
        repeats=args.repeats,
        gpu_ids=gpu_ids[:gpus],
        bench_id=bench_id,
        bench_dir=args.runs_dir / bench_id,
    )


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


def write_outputs(
    settings: Settings, results: Sequence[Result], args: argparse.Namespace, argv: list[str]
) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    facts = hardware_facts(settings.gpu_ids, args.out)
    rows = table_rows(results, settings.global_batch, settings.on_gpu, facts)
    setup = {
        "command": shlex.join(["python", "bench/scaling.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "torch": torch.__version__,
        "config": args.config or "defaults",
        "overrides": " ".join(args.overrides) or "none",
        "global batch": f"{settings.global_batch} images per optimizer step in every run",
        "steps": f"{settings.warmup} warm-up + {settings.steps} timed, {settings.repeats} repeat(s), "
        "median kept",
        "devices": facts["device_names"],
        "driver": facts["driver"],
        "interconnect": facts["interconnect"],
        "runs": f"{settings.bench_dir} (wandb group {settings.bench_id})",
    }
    crossing = [result.case.name for result in results if result.crosses_epoch_end]
    if crossing:
        setup["caution"] = f"{', '.join(crossing)}: {EPOCH_END_CAUTION}"
    write_csv(rows, args.out / "scaling.csv")
    write_markdown(rows, args.out / "scaling.md", setup, settings.on_gpu)
    write_plot(rows, args.out / "scaling.png", settings.on_gpu)
    print((args.out / "scaling.md").read_text())
    print(f"wrote {args.out / 'scaling.csv'}, {args.out / 'scaling.md'}, {args.out / 'scaling.png'}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        settings = resolve_settings(args)
        cases = plan_cases(settings.gpus, settings.on_gpu, args.sweep)
        check_divisible(settings.global_batch, cases)
        total_steps = settings.warmup + settings.steps
        epochs = [epochs_needed(settings.cfg, case, settings.global_batch, total_steps) for case in cases]
    except (ValueError, FileNotFoundError) as error:
        print(f"scaling: {error}", file=sys.stderr)
        return 2
    if settings.bench_dir.exists() and not args.dry_run:
        print(
            f"scaling: {settings.bench_dir} exists: choose another --bench-id (its runs would resume or mix)",
            file=sys.stderr,
        )
        return 2
    crossing = [case.name for case, n in zip(cases, epochs, strict=True) if n > 1]
    if crossing:
        print(f"scaling: warning: {', '.join(crossing)}: {EPOCH_END_CAUTION}", file=sys.stderr)
    results = [run_case(settings, case, n, args.dry_run) for case, n in zip(cases, epochs, strict=True)]
    if not args.dry_run:
        write_outputs(settings, results, args, argv)
    return 1 if any(result.failure for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
