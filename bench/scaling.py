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

This file plans the matrix and checks it before the first run; the runs and their measurement are in
scaling_runs.py, the hardware facts in scaling_hardware.py, the CSV, table and plot in scaling_report.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from scaling_hardware import hardware_facts, visible_gpu_ids
from scaling_report import table_rows, write_csv, write_markdown, write_plot
from scaling_runs import Case, Result, Settings, epochs_needed, run_case

from train.config import load_config

EPOCH_END_CAUTION = ("the timed steps cross an epoch end, so a checkpoint and a new loader are timed; use "
                     "fewer steps or a larger training split")


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
