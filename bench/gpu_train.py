"""One-device training throughput: our training path against a loop written the way torchvision's detection
reference writes it, on the same synthetic COCO-like images, model, batch, AMP and worker count.

    python bench/gpu_train.py --device cuda --images 256 --image-size 640 --batch-size 4 --steps 50 \\
        --warmup 10 --amp bf16 --workers 8 --repeats 3

- ours: `train/main.py` (strategy single) reading data_prep WebDataset shards: uint8 JPEG decoding with
  torchvision.io in the workers, pinned memory, conversion to float on the device. images/s is the run's own
  figure for the steps after warm-up (metrics.jsonl, which ends the window on a device synchronisation).
- baseline: references/detection as of torchvision 0.29 (train.py, engine.py, coco_utils.py): a
  file-per-image CocoDetection with PIL decoding, the boxes part of ConvertCocoPolysToMask,
  RandomHorizontalFlip, PILToTensor + ToDtype(float) on the CPU, RandomSampler + BatchSampler(drop_last),
  `.to(device)` in the loop, autocast with a GradScaler for fp16 only, SGD 0.02/0.9/1e-4 with the reference's
  linear warm-up, and the MetricLogger's `.item()` of every loss each step. It is timed from a
  synchronisation after the warm-up steps to one after the last step.

Both start from the same weights (--weights, or the same random initialisation from seed 0) of the same
model (train.model.build_model) and read the same images. Ours and the baseline alternate within each repeat,
each in a fresh process; the table shows the medians. The target is ours >= 1.5x baseline on one GPU; on the
CPU the figures only test this harness.
Prints a markdown table and appends the result as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import torchvision
from reference_loop import ReferenceCocoDetection, ReferenceTrainTransform, collate_fn, reference_train_step
from results import append_result
from torch.optim.lr_scheduler import LinearLR
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from data_prep.__main__ import main as data_prep_main
from data_prep.manifest import manifest_classes
from data_prep.synth import write_synthetic_coco
from launch.torchrun import TRAIN_SCRIPT
from train.config import ModelConfig
from train.metrics import METRICS_FILE_NAME
from train.model import build_model
from train.precision import AMP_DTYPES
from train.shard_reader import samples_per_rank, split_shards

TARGET_RATIO = 1.5
SEED = 0
# engine.py warms up over min(1000, len(data_loader) - 1) iterations: 1000 on a COCO-sized epoch
REFERENCE_WARMUP_ITERS = 1000


@dataclass(frozen=True)
class Settings:
    """What both loops share."""

    device: str
    model: str
    weights: str | None
    min_size: int
    max_size: int
    batch_size: int
    amp: str
    workers: int
    warmup: int
    steps: int

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def log_every(self) -> int:
        """Ours logs at the end of warm-up and at equal intervals after it, so the timed steps are exactly a
        whole number of logged intervals (its logging cost is that of a run logging that often)."""
        return math.gcd(self.warmup, self.steps)


@dataclass(frozen=True)
class BenchData:
    """One synthetic set, both as COCO files (the baseline's input) and as shards (ours)."""

    annotations: Path
    images_dir: Path
    manifest: Path
    sizes: str  # what the images measure, for the table


def describe_sizes(annotations: Path) -> str:
    """'640 x 481-640 px, mean 598x571': the synthetic set mixes orientations and aspect ratios."""
    images = json.loads(annotations.read_text())["images"]
    longs = [max(i["width"], i["height"]) for i in images]
    shorts = [min(i["width"], i["height"]) for i in images]
    mean_w = statistics.mean(i["width"] for i in images)
    mean_h = statistics.mean(i["height"] for i in images)
    long_text = f"{min(longs)}" if min(longs) == max(longs) else f"{min(longs)}-{max(longs)}"
    return f"{long_text} x {min(shorts)}-{max(shorts)} px, mean {mean_w:.0f}x{mean_h:.0f}"


def prepare_data(root: Path, num_images: int, image_size: int, workers: int) -> BenchData:
    annotations = write_synthetic_coco(
        root / "coco", num_images=num_images, image_size=image_size, seed=SEED, num_workers=max(1, workers)
    )
    images_dir = root / "coco" / "images"
    exit_code = data_prep_main([
        "shard", "--input", f"{annotations}:{images_dir}", "--out", str(root / "shards"),
        "--splits", "train=1.0", "--num-workers", str(workers), "--seed", str(SEED),
    ])
    if exit_code != 0:
        raise RuntimeError(f"data_prep shard failed (exit code {exit_code}) on {annotations}")
    manifest = root / "shards" / "manifest.json"
    sharded = samples_per_rank(split_shards(manifest, "train"), rank=0, world_size=1, training=True)
    if sharded != num_images:
        raise RuntimeError(f"{manifest}: {sharded} training samples, expected all {num_images} images")
    return BenchData(annotations, images_dir, manifest, describe_sizes(annotations))


# ---- ours ------------------------------------------------------------------------------------------------
def ours_overrides(settings: Settings, data: BenchData, run_dir: Path) -> list[str]:
    """One epoch that holds warm-up + timed steps, logged intervals that split them, nothing else (no
    evaluation, no checkpoint until the end, no resume, no wandb)."""
    return [
        f"run_dir={run_dir}",
        f"seed={SEED}",
        "strategy=single",
        f"device={settings.device}",
        f"data.manifest={data.manifest}",
        "data.train_split=train",
        "data.val_split=train",  # the manifest has one split; evaluation is off, so these are never read
        "data.test_split=train",
        f"data.batch_size={settings.batch_size}",
        f"data.num_workers={settings.workers}",
        f"model.name={settings.model}",
        f"model.weights={settings.weights or 'null'}",
        f"model.min_size={settings.min_size}",
        f"model.max_size={settings.max_size}",
        "model.frozen_batchnorm=true",
        "optim.accumulate_steps=1",
        f"train.amp={settings.amp}",
        "train.epochs=1",
        f"train.max_steps={settings.total_steps}",
        f"train.throughput_warmup_steps={settings.warmup}",
        f"train.log_every={settings.log_every}",
        "eval.every_epochs=0",
        "eval.test_at_end=false",
        "checkpoint.every_steps=0",
        "checkpoint.resume=false",
        "wandb.mode=disabled",
    ]


def run_ours(settings: Settings, data: BenchData, run_dir: Path) -> dict:
    """images/s, data-wait share and peak memory of one train/main.py run, from its metrics.jsonl."""
    command = [sys.executable, TRAIN_SCRIPT, *ours_overrides(settings, data, run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode != 0:
        raise RuntimeError(
            f"train/main.py failed with exit code {finished.returncode}: {' '.join(command)}\n"
            f"{finished.stderr[-4000:]}"
        )
    return timed_window(run_dir / METRICS_FILE_NAME, settings)


def timed_window(path: Path, settings: Settings) -> dict:
    """The timed steps' images/s and data-wait share from the logged intervals after warm-up.

    Each interval's images/s covers exactly its own steps (the window starts where the previous one ended,
    after a synchronisation), so the window's rate is all its images over the intervals' summed durations.
    """
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    timed = [r for r in records if r.get("kind") == "train" and r["step"] > settings.warmup]
    interval = settings.log_every
    expected = list(range(settings.warmup + interval, settings.total_steps + 1, interval))
    if [r["step"] for r in timed] != expected or any("images_per_s" not in r for r in timed):
        raise RuntimeError(f"{path}: expected train records with images_per_s at steps {expected}, got "
                           f"{[(r['step'], r.get('images_per_s')) for r in timed]}")
    images_per_interval = settings.batch_size * interval
    durations = [images_per_interval / r["images_per_s"] for r in timed]
    walls = [r["step_time_s"] * interval for r in timed]
    waits = [r["data_wait_share"] * wall for r, wall in zip(timed, walls, strict=True)]
    peaks = [r["max_memory_allocated_mb"] for r in timed if "max_memory_allocated_mb" in r]
    return {
        "images_per_s": images_per_interval * len(timed) / sum(durations),
        "data_wait_share": sum(waits) / sum(walls),
        "peak_memory_mb": max(peaks) if peaks else None,
    }


# ---- the baseline, as references/detection does it (bench/reference_loop.py) ---------------------------
def run_baseline(settings: Settings, data: BenchData) -> dict:
    """One baseline run (in a fresh process): images/s over the steps after warm-up."""
    device = torch.device(settings.device)
    classes = manifest_classes(data.manifest)
    transform = ReferenceTrainTransform(classes.label_by_category_id())
    dataset = ReferenceCocoDetection(str(data.images_dir), str(data.annotations), transform)
    batch_sampler = BatchSampler(RandomSampler(dataset), settings.batch_size, drop_last=True)
    loader = DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=settings.workers, collate_fn=collate_fn
    )

    torch.manual_seed(SEED)  # as ours does before building, so both start from the same weights
    model, _ = build_model(ModelConfig(settings.model, weights=settings.weights, min_size=settings.min_size,
                                       max_size=settings.max_size, frozen_batchnorm=True), classes.num_classes)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    lr_scheduler = LinearLR(optimizer, start_factor=1.0 / 1000, total_iters=REFERENCE_WARMUP_ITERS)
    scaler = torch.amp.GradScaler(device.type) if settings.amp == "fp16" else None
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    amp_dtype = AMP_DTYPES[settings.amp]

    model.train()
    data_start = time.perf_counter()
    data_wait = 0.0  # of the timed steps
    timed_start = None
    for step, (images, targets) in enumerate(loader, start=1):
        if timed_start is not None:
            data_wait += time.perf_counter() - data_start
        reference_train_step(model, optimizer, lr_scheduler, scaler, images, targets, device, amp_dtype)
        if step == settings.warmup:
            sync()
            timed_start = time.perf_counter()
        if step == settings.total_steps:
            break
        data_start = time.perf_counter()
    sync()
    end = time.perf_counter()
    return {
        "images_per_s": settings.steps * settings.batch_size / (end - timed_start),
        "data_wait_share": data_wait / (end - timed_start),
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def run_baseline_in_fresh_process(settings: Settings, data: BenchData) -> dict:
    """A spawned (not forked) process: it starts its own CUDA context, as ours does, and its DataLoader
    workers may fork from it (ProcessPoolExecutor's workers are not daemonic)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_baseline, settings, data).result()


# ---- the report ------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def summarize(
    settings: Settings, args: argparse.Namespace, data: BenchData, ours: list[dict], baseline: list[dict]
) -> dict:
    ours_rate = statistics.median(r["images_per_s"] for r in ours)
    baseline_rate = statistics.median(r["images_per_s"] for r in baseline)
    ratio = ours_rate / baseline_rate
    return {
        "benchmark": "gpu_train",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device_name": device_name(settings.device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "images": args.images,
        "image_size": args.image_size,
        "image_sizes": data.sizes,
        **asdict(settings),
        "repeats": args.repeats,
        "ours_images_per_s": ours_rate,
        "baseline_images_per_s": baseline_rate,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO if settings.device == "cuda" else None,
        "ours_runs": ours,
        "baseline_runs": baseline,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def _share(runs: list[dict]) -> str:
    return f"{100 * statistics.median(r['data_wait_share'] for r in runs):.0f}%"


def markdown_table(result: dict) -> str:
    ours_rates = ", ".join(f"{r['images_per_s']:.2f}" for r in result["ours_runs"])
    baseline_rates = ", ".join(f"{r['images_per_s']:.2f}" for r in result["baseline_runs"])
    lines = [
        "| device | torch / torchvision | model | images | image size | batch | AMP | workers "
        "| steps (+warm-up) | ours img/s | baseline img/s | ratio (ours/baseline) |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| {result['device_name']} | {result['torch']} / {result['torchvision']} | {result['model']} "
        f"| {result['images']} | {result['image_sizes']}, "
        f"resized to {result['min_size']}-{result['max_size']} "
        f"| {result['batch_size']} | {result['amp']} | {result['workers']} "
        f"| {result['steps']} (+{result['warmup']}) | {result['ours_images_per_s']:.2f} "
        f"| {result['baseline_images_per_s']:.2f} | {result['ratio']:.2f}x |",
        "",
        f"- median of {result['repeats']} repeats; ours {ours_rates}; baseline {baseline_rates} img/s",
        f"- data-wait share of the timed steps (median): ours {_share(result['ours_runs'])}, baseline "
        f"{_share(result['baseline_runs'])}",
    ]
    ours_peaks = [r["peak_memory_mb"] for r in result["ours_runs"]]
    baseline_peaks = [r["peak_memory_mb"] for r in result["baseline_runs"]]
    if None not in ours_peaks + baseline_peaks:
        lines.append(f"- peak GPU memory allocated: ours {max(ours_peaks):.0f} MB, baseline "
                     f"{max(baseline_peaks):.0f} MB")
    if result["target_met"] is None:
        lines.append(f"- target ours >= {TARGET_RATIO}x baseline on one GPU: not judged, these are CPU "
                     "figures (they test the harness; run with --device cuda on a GPU machine)")
    else:
        verdict = "met" if result["target_met"] else "NOT met"
        lines.append(f"- target ours >= {TARGET_RATIO}x baseline on one GPU: {verdict} "
                     f"({result['ratio']:.2f}x)")
    return "\n".join(lines)


# ---- the command line ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="fasterrcnn_resnet50_fpn", help="a name in train.model")
    parser.add_argument("--weights", help="weights for both: a torchvision name or a local file (default: random init)")
    parser.add_argument("--images", type=int, default=256,
                        help="synthetic images (one epoch must hold all steps)")
    parser.add_argument("--image-size", type=int, default=640,
                        help="long side of the images (the short side is 0.75 to 1 of it)")
    parser.add_argument("--min-size", type=int, default=800, help="the model's resize (min_size)")
    parser.add_argument("--max-size", type=int, default=1333, help="the model's resize (max_size)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them (at least 1)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="bf16")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_results/gpu_train.jsonl"),
                        help="JSON lines file the result is appended to")
    parser.add_argument("--work-dir", type=Path,
                        help="a new directory to keep the data and runs in (default: a temporary directory, "
                        "removed at the end)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu to test the harness)")
    for name in ("images", "image_size", "min_size", "max_size", "batch_size", "steps", "warmup", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.work_dir is not None and args.work_dir.exists() and any(args.work_dir.iterdir()):
        parser.error(f"--work-dir {args.work_dir} is not empty: give a new or empty directory")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.images // args.batch_size < args.warmup + args.steps:
        parser.error(
            f"--images {args.images} gives {args.images // args.batch_size} full batches of "
            f"{args.batch_size}, fewer than the {args.warmup + args.steps} steps (warm-up + timed): an epoch "
            "end would fall inside the timed window; raise --images"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(args.device, args.model, args.weights, args.min_size, args.max_size, args.batch_size,
                        args.amp, args.workers, args.warmup, args.steps)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-gpu-train-"))
    try:
        data = prepare_data(work_dir / "data", args.images, args.image_size, args.workers)
        ours, baseline = [], []
        for repeat in range(args.repeats):
            ours.append(run_ours(settings, data, work_dir / "runs" / f"ours-r{repeat}"))
            baseline.append(run_baseline_in_fresh_process(settings, data))
            print(f"repeat {repeat + 1}/{args.repeats}: ours {ours[-1]['images_per_s']:.2f} img/s, "
                  f"baseline {baseline[-1]['images_per_s']:.2f} img/s", flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    result = summarize(settings, args, data, ours, baseline)
    print(markdown_table(result))
    append_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
