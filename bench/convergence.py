"""Convergence: the same model and recipe trained by our loop and by a torchvision-reference-style loop on the
same images, for several seeds; COCO AP and AP50 on a held-out split, per seed, and their spread.

    python bench/convergence.py --config configs/demo_cpu.yaml --seeds 0 1 2 --epochs 2 --batch-size 4

- The model (name, sizes, builder_kwargs, BatchNorm kind) and the recipe (the `optim` section: SGD or AdamW,
  learning rate, weight decay, linear warm-up, then a constant or cosine rate; horizontal flips with
  `data.hflip_prob`) come from --config; `data.augment` reaches ours only (the reference keeps its "hflip"
  preset). Both loops build the model with train.model.build_model after torch.manual_seed(seed), so a seed
  gives both the same initial weights. Freezing phases are left out (the reference has none); both train
  --batch-size images per step on one process, in float32 (no autocast, the default memory format).
- ours: train/main.py (strategy single) on data_prep shards, evaluated by train.evaluate on the val split.
- reference: references/detection's dataset, transform and step (bench/gpu_train.py has them) with
  RandomSampler + BatchSampler(drop_last), evaluated as references/detection evaluates: one image at a time
  against pycocotools' COCO of the original annotations file. Our final checkpoint is scored by that same
  evaluator too, so an evaluation difference would show as a gap between ours' two columns.

Prints a markdown table and appends the result as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from reference_loop import ReferenceCocoDetection, ReferenceTrainTransform, collate_fn, reference_train_step
from results import append_result
from torch.optim.lr_scheduler import ChainedScheduler, CosineAnnealingLR, LinearLR, LRScheduler
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from torchvision.io import ImageReadMode, decode_image

from data_prep.__main__ import main as data_prep_main
from data_prep.manifest import load_manifest, manifest_classes
from data_prep.synth import write_synthetic_coco
from launch.torchrun import TRAIN_SCRIPT
from train.checkpoint import load_checkpoint
from train.config import Config, OptimConfig, load_config
from train.metrics import METRICS_FILE_NAME
from train.model import build_model, model_from_checkpoint


@dataclass(frozen=True)
class Settings:
    config: str
    batch_size: int
    epochs: int
    workers: int

    def steps(self, train_images: int) -> int:
        """Both loops take this many steps: the reference's full batches (drop_last) of every epoch."""
        return self.epochs * (train_images // self.batch_size)

    def schedule_steps(self, train_images: int) -> int:
        """The length of ours' cosine schedule (its epochs end with a partial batch); the reference's too."""
        return self.epochs * -(-train_images // self.batch_size)


@dataclass(frozen=True)
class BenchData:
    images_dir: Path
    train_annotations: Path  # COCO files of the manifest's train and val images, for the reference loop
    val_annotations: Path
    manifest: Path
    train_images: int


def prepare_data(root: Path, num_images: int, image_size: int, seed: int) -> BenchData:
    """A synthetic set sharded into train/val, and the same two splits as COCO files."""
    annotations = write_synthetic_coco(root / "coco", num_images=num_images, image_size=image_size, seed=seed,
                                       num_workers=2)
    images_dir = root / "coco" / "images"
    exit_code = data_prep_main(["shard", "--input", f"{annotations}:{images_dir}", "--out", str(root / "shards"),
                                "--splits", "train=0.8,val=0.2", "--seed", str(seed)])
    if exit_code != 0:
        raise RuntimeError(f"data_prep shard failed (exit code {exit_code}) on {annotations}")
    manifest = root / "shards" / "manifest.json"
    coco = json.loads(annotations.read_text())
    paths = {}
    for split in ("train", "val"):
        ids = set(load_manifest(manifest)["splits"][split]["image_ids"])
        subset = {**coco, "images": [i for i in coco["images"] if i["id"] in ids],
                  "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
        paths[split] = root / f"{split}.json"
        paths[split].write_text(json.dumps(subset))
    return BenchData(images_dir, paths["train"], paths["val"], manifest, len(load_manifest(manifest)["splits"]
                                                                             ["train"]["image_ids"]))


def recipe(settings: Settings) -> Config:
    cfg = load_config(settings.config)
    if cfg.optim.schedule not in ("constant", "cosine") or cfg.optim.accumulate_steps != 1:
        raise ValueError(f"{settings.config}: the reference-style loop does constant or cosine schedules "
                         "without gradient accumulation")
    return cfg


# ---- ours ------------------------------------------------------------------------------------------------
def run_ours(settings: Settings, data: BenchData, seed: int, run_dir: Path) -> dict:
    """train/main.py with the recipe; its own evaluation of val, and the reference evaluator's."""
    overrides = [
        f"run_dir={run_dir}", f"seed={seed}", "strategy=single", "device=cpu",
        f"data.manifest={data.manifest}", "data.test_split=val", f"data.batch_size={settings.batch_size}",
        f"data.num_workers={settings.workers}", "freeze.phases=[]", "optim.reference_batch_size=null",
        "optim.clip_grad_norm=null", f"train.epochs={settings.epochs}",
        f"train.max_steps={settings.steps(data.train_images)}", "train.amp=off", "train.channels_last=false",
        "eval.every_epochs=0", "eval.test_at_end=true", "eval.score_threshold=0.0",
        "checkpoint.resume=false", "wandb.mode=disabled",
    ]
    command = [sys.executable, TRAIN_SCRIPT, "--config", settings.config, *overrides]
    finished = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "WANDB_MODE": "disabled"})
    if finished.returncode != 0:
        raise RuntimeError(f"train/main.py failed ({finished.returncode}): {' '.join(command)}\n"
                           f"{finished.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / METRICS_FILE_NAME).read_text().splitlines()]
    own = next(r for r in reversed(records) if r.get("kind") == "eval" and r.get("split") == "val")
    checkpoint = max(run_dir.glob("checkpoint-*.pt"))
    state = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(state, checkpoint)
    reference = reference_evaluate(model, data)
    return {"AP": own["AP"], "AP50": own["AP50"], "AP_by_reference_eval": reference["AP"],
            "AP50_by_reference_eval": reference["AP50"]}


# ---- the reference-style loop ----------------------------------------------------------------------------
def run_reference(settings: Settings, data: BenchData, seed: int) -> dict:
    """engine.train_one_epoch's loop with the recipe, for as many steps as ours, then its evaluation."""
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = recipe(settings)
    classes = manifest_classes(data.manifest)
    transform = ReferenceTrainTransform(classes.label_by_category_id(), cfg.data.hflip_prob)
    dataset = ReferenceCocoDetection(str(data.images_dir), str(data.train_annotations), transform)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, settings.batch_size, drop_last=True),
                        num_workers=settings.workers, collate_fn=collate_fn)
    torch.manual_seed(seed)  # as train/main.py does before building: the same initial weights
    model, _ = build_model(cfg.model, classes.num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = cfg.optim
    if optim.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    schedule = reference_schedule(optimizer, optim, settings.schedule_steps(len(dataset)))
    model.train()
    step, steps = 0, settings.steps(len(dataset))
    while step < steps:
        for images, targets in loader:
            reference_train_step(model, optimizer, schedule, None, images, targets, torch.device("cpu"), None)
            step += 1
            if step == steps:
                break
    return reference_evaluate(model, data)


def reference_schedule(optimizer, optim: OptimConfig, total_steps: int) -> LRScheduler:
    """Warm-up as engine.py's LinearLR, times train.py's CosineAnnealingLR (stepped per step here)."""
    schedules = [LinearLR(optimizer, start_factor=optim.warmup_factor, total_iters=max(optim.warmup_steps, 1))]
    if optim.schedule == "cosine":
        schedules.append(CosineAnnealingLR(optimizer, T_max=total_steps))
    return ChainedScheduler(schedules, optimizer)


@torch.inference_mode()
def reference_evaluate(model: torch.nn.Module, data: BenchData) -> dict:
    """references/detection's evaluation: each val image alone through the model, COCOeval on the original
    annotations (the detections' labels mapped back to category ids)."""
    classes = manifest_classes(data.manifest)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(data.val_annotations))
    model.eval()
    results = []
    for image_id in sorted(coco.imgs):
        path = data.images_dir / coco.imgs[image_id]["file_name"]
        image = decode_image(str(path), mode=ImageReadMode.RGB).float() / 255
        output = model([image])[0]
        for box, score, label in zip(output["boxes"].tolist(), output["scores"].tolist(),
                                     output["labels"].tolist(), strict=True):
            results.append({"image_id": image_id, "category_id": classes.category_of(label).category_id,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    if not results:
        return {"AP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1])}


def run_reference_in_fresh_process(settings: Settings, data: BenchData, seed: int) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_reference, settings, data, seed).result()


# ---- the report ------------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def markdown_table(result: dict) -> str:
    columns = [("ours AP", "ours", "AP"), ("ours AP50", "ours", "AP50"),
               ("ours AP50, reference eval", "ours", "AP50_by_reference_eval"),
               ("reference AP", "reference", "AP"), ("reference AP50", "reference", "AP50")]
    lines = ["| seed | " + " | ".join(title for title, _, _ in columns) + " |",
             "| ---: |" + " ---: |" * len(columns)]
    for index, seed in enumerate(result["seeds"]):
        lines.append(f"| {seed} | " + " | ".join(f"{result[loop][index][key]:.3f}" for _, loop, key in columns)
                     + " |")
    lines.append("| mean ± sd (min-max) | " + " | ".join(
        spread([run[key] for run in result[loop]]) for _, loop, key in columns) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo_cpu.yaml", help="the model section is used")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the train split per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=500, help="synthetic images, split train 0.8 / val 0.2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of both loops")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_results/convergence.jsonl"))
    parser.add_argument("--work-dir", type=Path, help="keep data and runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "images", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(args.config, args.batch_size, args.epochs, args.workers)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-convergence-"))
    ours, reference = [], []
    try:
        data = prepare_data(work_dir / "data", args.images, args.image_size, seed=0)
        for seed in args.seeds:
            ours.append(run_ours(settings, data, seed, work_dir / "runs" / f"ours-seed{seed}"))
            print(f"seed {seed}: ours AP50 {ours[-1]['AP50']:.3f}", flush=True)
            reference.append(run_reference_in_fresh_process(settings, data, seed))
            print(f"seed {seed}: ours AP50 {ours[-1]['AP50']:.3f} (reference eval "
                  f"{ours[-1]['AP50_by_reference_eval']:.3f}), reference AP50 {reference[-1]['AP50']:.3f}",
                  flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    cfg = recipe(settings)
    result = {"settings": asdict(settings), "model": asdict(cfg.model), "optim": asdict(cfg.optim),
              "hflip_prob": cfg.data.hflip_prob, "images": args.images,
              "image_size": args.image_size, "seeds": args.seeds, "ours": ours, "reference": reference,
              "torch": torch.__version__, "torchvision": torchvision.__version__, "cpu": platform.processor(),
              "threads": torch.get_num_threads()}
    print(markdown_table(result))
    append_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
