"""One round of the improvement loop: fine-tune the current best model on new data, keep it only if better.

    python -m improve --base runs/improve/best.pt --data data/new/manifest.json [--data M2 ...] \\
        --test-manifest data/heldout/manifest.json --test-split test --db attributes.db --margin 0.0 \\
        --run-dir runs/improve/round-3 [--config configs/finetune_heads.yaml] [dotted.key=value ...]
    torchrun --nproc_per_node=2 -m improve ...   # the same round, fine-tuned and evaluated under DDP

What happens, in order:
1. The config is resolved: the YAML (default configs/finetune_heads.yaml: backbone body frozen, FPN and heads
   train), then the base model's architecture and input size (model.name, model.min_size, model.max_size from
   the base checkpoint's config, the eps of its FrozenBatchNorm2d layers, its model.builder_kwargs and its
   eval.max_detections), then the command-line overrides.
   data.manifest, model.weights and run_dir are this command's to set.
2. The class list grows to the union of the base model's classes and the new data's (labels 1..K in order of
   category id). The data sets become one manifest under RUN_DIR/data (data_prep/data_union.py); when the class
   list changed, the base is written in the new shape to RUN_DIR/base-grown.pt with every known class's rows
   kept by category id (improve/class_growth.py), and fine-tuning starts from it.
3. `train` (train/training.py) fine-tunes into RUN_DIR (checkpoints, metrics, its own wandb run, resume).
4. The base and the candidate (RUN_DIR/best.pt, the best validation AP, else the last checkpoint) are
   evaluated on the same fixed held-out split, each with its own class list against the same ground truth:
   a class a model does not know counts against it.
5. The candidate is promoted (copied atomically to --promote-to, default RUN_DIR/../best.pt, the copy checked
   against it first) only when its AP exceeds the base's by more than --margin; otherwise nothing is written
   there and the base stays best.
6. The round (data, schedule, both scores, decision) goes to the database, to RUN_DIR/round.json and to an
   offline-first wandb run under RUN_DIR/decision.

The loop: copy the first model to the --promote-to path once, then pass that path as --base every round,
with a new run dir per round (a run dir that already holds checkpoints resumes from them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from common.atomic_io import copy_file_atomically, write_text_atomically
from configs import bundled_config
from data_prep.class_list import ClassList
from data_prep.data_union import write_union_manifest
from data_prep.manifest import manifest_classes
from extract.database import open_database
from improve.class_growth import grow_state_dict, needs_growth
from train.checkpoint import (
    BEST_CHECKPOINT_NAME,
    CheckpointError,
    checkpoint_classes,
    latest_valid_checkpoint,
    load_model_checkpoint,
    save_checkpoint,
)
from train.config import Config, config_to_dict, load_config
from train.evaluate import evaluate, per_class_metrics
from train.model import (
    build_model,
    model_from_checkpoint,
    set_max_detections,
    trained_max_detections,
    trained_model_config,
)
from train.precision import AMP_DTYPES
from train.readers import split_loader
from train.shard_reader import split_shards
from train.strategy import Strategy, setup_strategy
from train.training import seed_everything, train
from train.wandb_run import finish, resolve_wandb_mode, start_wandb_run

DEFAULT_CONFIG = bundled_config("finetune_heads.yaml")
SET_BY_THIS_COMMAND = {"data.manifest": "--data", "model.weights": "--base", "run_dir": "--run-dir"}
# the base's architecture, input resolution and the FrozenBatchNorm2d eps its weights were trained with
INHERITED_MODEL_KEYS = ("name", "min_size", "max_size", "frozen_batchnorm_eps")
GROWN_BASE_NAME = "base-grown.pt"
ROUND_RECORD_NAME = "round.json"


@dataclass
class RoundOutcome:
    round_index: int
    base: str
    candidate: str
    data: list[str]
    schedule: str
    base_metrics: dict[str, float]
    candidate_metrics: dict[str, float]
    margin: float
    promoted: bool
    best_path: str  # where the best model is after this round: the --promote-to path, or the base

    @property
    def base_map(self) -> float:
        return self.base_metrics["AP"]

    @property
    def candidate_map(self) -> float:
        return self.candidate_metrics["AP"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m improve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path, help="checkpoint of the current best model")
    parser.add_argument("--data", required=True, action="append", type=Path,
                        help="manifest.json of a data_prep output to fine-tune on (repeat for several)")
    parser.add_argument("--test-manifest", required=True, type=Path,
                        help="manifest holding the held-out split")
    parser.add_argument("--test-split", default="test", help="the held-out split both models are scored on")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="YAML in configs/ (the freezing schedule and optimiser)")
    parser.add_argument("--db", required=True, help="attributes database (path or URL) recording the round")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="promote only when candidate AP > base AP + margin (AP is in [0, 1])")
    parser.add_argument("--run-dir", required=True, type=Path, help="a new directory for this round")
    parser.add_argument("--promote-to", type=Path,
                        help="where the best model lives (default RUN_DIR/../best.pt)")
    parser.add_argument("--round", type=int, dest="round_index",
                        help="round number to record (default: rounds in the database + 1)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides, applied last")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what this command sets itself, or cannot compare, before any work starts."""
    for override in args.overrides:
        key = override.partition("=")[0]
        if key in SET_BY_THIS_COMMAND:
            raise ValueError(f"command line: {key} is set by {SET_BY_THIS_COMMAND[key]}, not by an override")
    if not math.isfinite(args.margin):
        raise ValueError(f"--margin must be a finite number, got {args.margin}")
    for path in [args.base, args.test_manifest, *args.data]:
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
    if not sum(shard.num_samples for shard in split_shards(args.test_manifest, args.test_split)):
        raise ValueError(f"{args.test_manifest}: split '{args.test_split}' is empty: nothing to score on")


def round_config(args: argparse.Namespace, base: dict, manifest: Path, weights: Path) -> Config:
    """The YAML, then the base's architecture, input size and builder arguments, then the overrides; then this
    round's paths."""
    trained = trained_model_config(base, args.base)
    inherited = [f"model.{key}={json.dumps(getattr(trained, key))}" for key in INHERITED_MODEL_KEYS]  # YAML values
    # its builder arguments too: representation_size shapes the weights; the rest as it was trained, by default
    inherited += [f"model.builder_kwargs.{key}={value}" for key, value in trained.builder_kwargs.given().items()]
    inherited.append(f"eval.max_detections={trained_max_detections(base)}")  # as the base was tested
    cfg = load_config(args.config, inherited + list(args.overrides))
    return dataclasses.replace(
        cfg, run_dir=str(args.run_dir), data=dataclasses.replace(cfg.data, manifest=str(manifest)),
        model=dataclasses.replace(cfg.model, weights=str(weights)),
    )


def describe_schedule(cfg: Config) -> str:
    """The freezing schedule as JSON ([] = everything trains), as the round records it."""
    return json.dumps([dataclasses.asdict(phase) for phase in cfg.freeze.phases], separators=(",", ":"))


@dataclass
class RoundPlan:
    """What a round trains on and starts from; the same on every rank (computed, nothing written)."""

    classes: ClassList  # the grown class list: base classes and data classes, labels by category id
    manifest: Path  # the union manifest of the --data sets, under RUN_DIR/data
    weights: Path  # the base, or RUN_DIR/base-grown.pt when the class list changed
    cfg: Config


def plan_round(args: argparse.Namespace, base: dict) -> RoundPlan:
    """Resolve the class list, the files the round will write and its config (which is checked here)."""
    base_classes = checkpoint_classes(base, args.base)
    classes = ClassList.union([base_classes, *map(manifest_classes, args.data)],
                              [str(args.base), *map(str, args.data)])
    weights = args.run_dir / GROWN_BASE_NAME if needs_growth(base_classes, classes) else args.base
    manifest = args.run_dir / "data" / "manifest.json"
    return RoundPlan(classes, manifest, weights, round_config(args, base, manifest, weights))


def write_round_inputs(args: argparse.Namespace, base: dict, plan: RoundPlan) -> None:
    """The union manifest and the grown base; rank 0 only."""
    data = plan.cfg.data
    write_union_manifest(args.data, plan.classes, plan.manifest.parent,
                         (data.train_split, data.val_split, data.test_split))
    if plan.weights != args.base:
        write_grown_base(base, plan.classes, plan.weights, seed=plan.cfg.seed, source=args.base)


def write_grown_base(base: dict, classes: ClassList, path: Path, seed: int, source: Path) -> None:
    """The base in the shape of `classes`; new classes get the fresh initialisation of a seeded model."""
    model_cfg = trained_model_config(base, source)
    seed_everything(seed)
    fresh, _ = build_model(model_cfg, classes.num_classes)
    grown, report = grow_state_dict(base["model"], fresh.state_dict(), checkpoint_classes(base, source), classes,
                                    architecture=model_cfg.name)
    save_checkpoint({"model": grown, "categories": classes.to_json(), "config": base["config"],
                     "grown_from": str(source)}, path)
    print(f"{report}; wrote {path}", flush=True)


def candidate_checkpoint(run_dir: Path) -> Path:
    """The round's result: best.pt (best validation AP) when validation ran, else the newest checkpoint."""
    best = run_dir / BEST_CHECKPOINT_NAME
    if best.is_file():
        return best
    found = latest_valid_checkpoint(run_dir)
    if found is None:
        raise RuntimeError(f"{run_dir}: fine-tuning left no checkpoint")
    return found[0]


class ToManifestLabels(nn.Module):
    """A detector whose output labels are renumbered into an evaluation manifest's, by category id.

    Detections of categories the manifest does not have are dropped: its ground truth has none of them.
    """

    def __init__(self, model: nn.Module, model_classes: ClassList, evaluation_classes: ClassList):
        super().__init__()
        self.model = model
        lookup = torch.full((model_classes.num_classes,), -1, dtype=torch.int64)
        for category in model_classes:
            if category.category_id in evaluation_classes:
                lookup[category.label] = evaluation_classes.label_of(category.category_id)
        self.register_buffer("lookup", lookup, persistent=False)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        renumbered = []
        for output in self.model(images):
            labels = self.lookup[output["labels"]]
            keep = labels >= 0
            renumbered.append({**{key: value[keep] for key, value in output.items()}, "labels": labels[keep]})
        return renumbered


def evaluate_checkpoint(path: Path, test_manifest: Path, split: str, cfg: Config, strategy: Strategy,
                        out_path: Path) -> dict[str, float]:
    """COCO metrics of a checkpoint on a manifest split, the model built as it was trained (its config) but capped
    at the round's eval.max_detections, so that the base and the candidate are scored alike."""
    state = load_model_checkpoint(path)
    model, _ = model_from_checkpoint(state, path)
    set_max_detections(model, cfg.eval.max_detections)
    classes = manifest_classes(test_manifest)
    model = ToManifestLabels(model, checkpoint_classes(state, path), classes).to(strategy.device)
    loader = split_loader(split_shards(test_manifest, split), cfg.data, strategy, training=False, classes=classes)
    return evaluate(model, loader, classes, strategy, strategy.device, out_path=out_path,
                    amp_dtype=AMP_DTYPES[cfg.train.amp], score_threshold=cfg.eval.score_threshold,
                    max_detections=cfg.eval.max_detections)


def decide(base_metrics: dict[str, float], candidate_metrics: dict[str, float], margin: float,
           split: str) -> bool:
    """Promote iff the candidate's AP beats the base's by more than the margin."""
    base_map, candidate_map = base_metrics["AP"], candidate_metrics["AP"]
    if math.isnan(base_map) or math.isnan(candidate_map):
        raise ValueError(f"split '{split}' has no ground-truth boxes: AP is undefined, nothing to compare")
    return candidate_map > base_map + margin


def write_round_record(outcome: RoundOutcome, path: Path) -> None:
    """The round as strict JSON, atomically: metrics that COCOeval cannot define (NaN) are written as null."""
    record = dataclasses.asdict(outcome)
    for key in ("base_metrics", "candidate_metrics"):
        record[key] = {name: None if math.isnan(value) else value for name, value in record[key].items()}
    write_text_atomically(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


def next_round_index(db_url: str) -> int:
    db = open_database(db_url)
    try:
        return len(db.improvement_rounds()) + 1
    finally:
        db.close()


def promote_and_record(db_url: str, outcome: RoundOutcome, architecture: str, base: dict, candidate: dict,
                       promote_to: Path) -> None:
    """Register both models, install the candidate at promote_to if promoted, then record the round."""
    base_names = checkpoint_classes(base, outcome.base).names
    candidate_names = checkpoint_classes(candidate, outcome.candidate).names
    db = open_database(db_url)
    try:
        # Models are registered by the hash of their file's bytes, and the base's file is usually the one
        # that promotion replaces: register it first.
        base_id = db.register_model(outcome.base, architecture, base_names, outcome.base_map,
                                    per_class_metrics(outcome.base_metrics))
        candidate_id = db.register_model(outcome.candidate, architecture, candidate_names, outcome.candidate_map,
                                         per_class_metrics(outcome.candidate_metrics))
        if outcome.promoted:
            copy_file_atomically(Path(outcome.candidate), promote_to)
        db.record_improvement_round(outcome.round_index, base_id, candidate_id, outcome.data,
                                    outcome.schedule, outcome.base_map, outcome.candidate_map,
                                    outcome.promoted, outcome.margin)
    finally:
        db.close()


def log_round_to_wandb(outcome: RoundOutcome, cfg: Config, run_dir: Path) -> None:
    """A small wandb run of its own for the decision (the fine-tuning has the run in RUN_DIR/wandb)."""
    summary = {"round": outcome.round_index, "base": outcome.base, "candidate": outcome.candidate,
               "data": outcome.data, "schedule": outcome.schedule, "margin": outcome.margin}
    run = start_wandb_run(run_dir / "decision", summary, resolve_wandb_mode(cfg.wandb.mode),
                          cfg.wandb.project, cfg.wandb.group, f"{cfg.wandb.name or run_dir.name}-decision",
                          {"finetune_config": config_to_dict(cfg)})
    if run is None:
        return
    values = {f"improve/{who}_{name}": value for who, metrics in
              (("base", outcome.base_metrics), ("candidate", outcome.candidate_metrics))
              for name, value in metrics.items() if name in ("AP", "AP50")}
    run.log({**values, "improve/promoted": int(outcome.promoted), "improve/round": outcome.round_index})
    run.summary.update({"promoted": outcome.promoted, "best_path": outcome.best_path})
    finish(run)


def run_round(args: argparse.Namespace, base: dict, plan: RoundPlan, strategy: Strategy) -> RoundOutcome:
    """Steps 2 to 6 of the module docstring, on every rank; files, database and wandb on rank 0 only."""
    run_dir, cfg = args.run_dir, plan.cfg
    round_index = args.round_index
    if round_index is None:
        round_index = strategy.broadcast_object(next_round_index(args.db) if strategy.is_main else None)
    if strategy.is_main:
        write_round_inputs(args, base, plan)
    strategy.barrier()

    train(cfg, strategy)

    candidate_path = candidate_checkpoint(run_dir)
    split = args.test_split
    base_metrics = evaluate_checkpoint(args.base, args.test_manifest, split, cfg, strategy,
                                       run_dir / f"detections_{split}_base.json")
    candidate_metrics = evaluate_checkpoint(candidate_path, args.test_manifest, split, cfg, strategy,
                                            run_dir / f"detections_{split}_candidate.json")
    promoted = decide(base_metrics, candidate_metrics, args.margin, split)
    promote_to = args.promote_to or run_dir.parent / BEST_CHECKPOINT_NAME
    best_path = promote_to if promoted else args.base
    outcome = RoundOutcome(
        round_index=round_index, base=str(args.base.resolve()), candidate=str(candidate_path.resolve()),
        data=[str(path.resolve()) for path in args.data], schedule=describe_schedule(cfg),
        base_metrics=base_metrics, candidate_metrics=candidate_metrics, margin=args.margin, promoted=promoted,
        best_path=str(best_path.resolve()),
    )
    if strategy.is_main:
        candidate = load_model_checkpoint(candidate_path)
        promote_and_record(args.db, outcome, cfg.model.name, base, candidate, promote_to)
        write_round_record(outcome, run_dir / ROUND_RECORD_NAME)
        log_round_to_wandb(outcome, cfg, run_dir)
        verdict = f"promoted to {promote_to}" if promoted else f"not promoted; the best stays {best_path}"
        print(f"round {round_index}: base AP {outcome.base_map:.4f}, candidate AP "
              f"{outcome.candidate_map:.4f}, margin {args.margin}: {verdict}", flush=True)
    strategy.barrier()
    return outcome


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_arguments(args)
        base = load_model_checkpoint(args.base)
        plan = plan_round(args, base)
    except (ValueError, CheckpointError) as error:
        print(f"improve: error: {error}", file=sys.stderr)
        return 2
    strategy = setup_strategy(plan.cfg.strategy, plan.cfg.device)
    run_round(args, base, plan, strategy)
    strategy.teardown()
    return 0

