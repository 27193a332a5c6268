"""The improvement loop for real: a base model trained on data without "can", then two rounds of improve.

Round 1 (one process) fine-tunes on the old and the new data (the new data adds the class "can", which
shifts the labels of shoe and bag) with a margin of -1, so the candidate must be promoted; round 2 (torchrun,
two gloo processes) starts from the promoted model with a margin of 1, which no AP can clear: the best stays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attributes_helpers import write_checkpoint
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import improve.round
from data_prep.__main__ import main as data_prep_main
from data_prep.class_list import ClassList
from data_prep.manifest import load_manifest
from data_prep.synth import write_synthetic_coco
from extract.database import open_database
from extract.detector import load_detector
from improve.round import DEFAULT_CONFIG, evaluate_checkpoint, round_config
from train.checkpoint import latest_valid_checkpoint, load_checkpoint, tensor_hash
from train.config import config_to_dict, load_config
from train.evaluate import per_class_metrics
from train.shard_reader import decode_sample, iter_raw_samples
from train.strategy import setup_strategy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CAN = 4  # the category id that the first data set lacks
TINY = ["model.min_size=96", "model.max_size=128", "data.batch_size=2", "data.num_workers=0",
        "optim.warmup_steps=1", "train.log_every=1", "wandb.mode=offline"]


def make_shards(root: Path, seed: int, drop_category: int | None, image_id_offset: int) -> Path:
    """A synthetic set sharded by data_prep; optionally without one category (and with shifted image ids)."""
    annotations_path = write_synthetic_coco(root / "raw", num_images=36, image_size=96, seed=seed)
    coco = json.loads(annotations_path.read_text())
    if drop_category is not None:
        coco["categories"] = [c for c in coco["categories"] if c["id"] != drop_category]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != drop_category]
    for image in coco["images"]:
        image["id"] += image_id_offset
    for annotation in coco["annotations"]:
        annotation["image_id"] += image_id_offset
    annotations_path.write_text(json.dumps(coco))
    exit_code = data_prep_main([
        "shard", "--input", f"{annotations_path}:{root / 'raw' / 'images'}", "--out", str(root / "shards"),
        "--splits", "train=0.7,val=0.15,test=0.15", "--shard-max-count", "8", "--num-workers", "1",
    ])
    assert exit_code == 0
    return root / "shards" / "manifest.json"


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{command[:3]} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def improve_command(nproc: int) -> list[str]:
    if nproc:
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "improve"]
    return [sys.executable, "-m", "improve"]


def reject_non_json(constant: str):
    raise AssertionError(f"round.json holds {constant}, which strict JSON readers reject")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def loop(module_dir):
    """Base training and both rounds; the tests below read what they left behind."""
    root = module_dir
    old_data = make_shards(root / "old", seed=1, drop_category=CAN, image_id_offset=0)
    new_data = make_shards(root / "new", seed=2, drop_category=None, image_id_offset=1000)
    base_dir = root / "base"
    run([sys.executable, "train/main.py", f"data.manifest={old_data}", f"run_dir={base_dir}",
         "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.frozen_batchnorm=false", "optim.lr=0.01",
         "train.epochs=1", "train.max_steps=6", "eval.every_epochs=0", "eval.test_at_end=false", *TINY])
    base = latest_valid_checkpoint(base_dir)[0]
    db, best = root / "attributes.db", root / "improve" / "best.pt"
    best.parent.mkdir()
    shutil.copyfile(base, best)  # the loop's starting point: the current best lives at one path
    common = ["--test-manifest", str(new_data), "--test-split", "test", "--db", str(db)]
    finetune = ["train.epochs=1", "train.max_steps=3", "eval.every_epochs=0", "eval.test_at_end=false", *TINY]
    rounds = [root / "improve" / "round-1", root / "improve" / "round-2"]
    first = run(improve_command(0) + ["--base", str(best), "--data", str(old_data), "--data", str(new_data),
                                      *common, "--margin", "-1", "--run-dir", str(rounds[0]), *finetune])
    best_after_round_1 = sha256(best)
    second = run(improve_command(2) + ["--base", str(best), "--data", str(new_data), *common, "--margin", "1",
                                       "--run-dir", str(rounds[1]), *finetune])
    return {"base": base, "old_data": old_data, "new_data": new_data, "db": db, "best": best,
            "rounds": rounds, "best_after_round_1": best_after_round_1,
            "stdout": [first.stdout, second.stdout]}


def test_grown_base_keeps_every_old_class_row_by_category_id(loop):
    base = load_checkpoint(loop["base"])
    grown = load_checkpoint(loop["rounds"][0] / "base-grown.pt")
    assert CAN not in {c["category_id"] for c in base["categories"]}
    assert [c["category_id"] for c in grown["categories"]] == [1, 3, 4, 7, 9]
    new_label = {c["category_id"]: c["label"] for c in grown["categories"]}
    for key, rows_per_class in (("cls_score", 1), ("bbox_pred", 4)):
        old = base["model"][f"roi_heads.box_predictor.{key}.weight"]
        new = grown["model"][f"roi_heads.box_predictor.{key}.weight"]
        assert new.shape[0] == 6 * rows_per_class
        for category in [{"label": 0, "category_id": None}, *base["categories"]]:
            old_label = category["label"]
            label = 0 if category["category_id"] is None else new_label[category["category_id"]]
            assert torch.equal(new[label * rows_per_class:(label + 1) * rows_per_class],
                               old[old_label * rows_per_class:(old_label + 1) * rows_per_class])
    assert new_label[7] == 4 and {c["name"]: c["label"] for c in base["categories"]}["shoe"] == 3  # shifted
    body = [k for k in base["model"] if k.startswith("backbone.") and base["model"][k].is_floating_point()]
    assert all(torch.equal(grown["model"][k], base["model"][k]) for k in body)


def test_round_1_trains_on_both_sets_relabelled_to_the_grown_class_list(loop):
    union_path = loop["rounds"][0] / "data" / "manifest.json"
    union = load_manifest(union_path)
    labels = {c["category_id"]: c["label"] for c in union["categories"]}
    assert labels == {1: 1, 3: 2, 4: 3, 7: 4, 9: 5}
    sources = [load_manifest(loop["old_data"]), load_manifest(loop["new_data"])]
    train_samples = sum(m["splits"]["train"]["num_samples"] for m in sources)
    assert union["splits"]["train"]["num_samples"] == train_samples
    union_classes = ClassList.from_json(union["categories"], source=union_path)
    read = relabelled = 0
    for shard in union["splits"]["train"]["shards"]:
        for sample in iter_raw_samples(union_path.parent / shard["file"]):
            read += 1
            _, target = decode_sample(sample, training=False, hflip=False, classes=union_classes)
            annotations = json.loads(sample["json"])["annotations"]
            assert target["labels"].tolist() == [labels[a["category_id"]] for a in annotations]
            relabelled += any(a["label"] != labels[a["category_id"]] for a in annotations)
    assert read == union["splits"]["train"]["num_samples"]
    assert relabelled > 0  # the old set's stored labels differ from the grown class list's; the reader maps them
    candidate = load_checkpoint(Path(json.loads((loop["rounds"][0] / "round.json").read_text())["candidate"]))
    assert candidate["categories"] == union["categories"]
    assert candidate["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 6


def test_both_models_are_scored_on_the_same_held_out_ground_truth(loop):
    run_dir = loop["rounds"][0]
    base_gt = json.loads((run_dir / "detections_test_base_gt.json").read_text())
    candidate_gt = json.loads((run_dir / "detections_test_candidate_gt.json").read_text())
    assert base_gt == candidate_gt and CAN in {a["category_id"] for a in base_gt["annotations"]}
    test_ids = load_manifest(loop["new_data"])["splits"]["test"]["image_ids"]
    assert sorted(image["id"] for image in base_gt["images"]) == sorted(test_ids)
    base_detections = json.loads((run_dir / "detections_test_base.json").read_text())
    assert base_detections and CAN not in {d["category_id"] for d in base_detections}  # it cannot know cans


def test_rounds_are_recorded_with_data_schedule_scores_and_decision(loop):
    db = open_database(loop["db"])
    try:
        rounds, models = db.improvement_rounds(), {m["id"]: m for m in db.models()}
    finally:
        db.close()
    assert [r["round_index"] for r in rounds] == [1, 2]
    first, second = rounds
    assert first["data"] == [str(loop["old_data"].resolve()), str(loop["new_data"].resolve())]
    assert second["data"] == [str(loop["new_data"].resolve())]
    for record, run_dir in zip(rounds, loop["rounds"], strict=True):
        saved = json.loads((run_dir / "round.json").read_text(), parse_constant=reject_non_json)
        phases = json.loads(record["schedule"])
        assert [p["frozen"] for p in phases] == [["backbone.body"]]  # configs/finetune_heads.yaml
        assert record["base_map"] == saved["base_metrics"]["AP"] and 0 <= record["base_map"] <= 1
        assert record["candidate_map"] == saved["candidate_metrics"]["AP"]
        assert record["promoted"] == (record["candidate_map"] > record["base_map"] + record["margin"])
        assert models[record["candidate_model_id"]]["checkpoint_path"] == saved["candidate"]
        # the per-class APs of the same held-out evaluation, with the model (round.json writes NaN as null)
        candidate_ap = models[record["candidate_model_id"]]["test_ap_per_class"]
        assert candidate_ap == per_class_metrics(saved["candidate_metrics"]) and "can" in candidate_ap
    assert (first["margin"], first["promoted"]) == (-1.0, True)
    assert (second["margin"], second["promoted"]) == (1.0, False)
    assert models[first["candidate_model_id"]]["class_names"] == ["bottle", "box", "can", "shoe", "bag"]
    assert models[first["base_model_id"]]["class_names"] == ["bottle", "box", "shoe", "bag"]
    assert first["base_model_id"] != first["candidate_model_id"]  # registered before best.pt was replaced
    assert models[first["base_model_id"]]["checkpoint_sha256"] == sha256(loop["base"])
    first_saved = json.loads((loop["rounds"][0] / "round.json").read_text())
    assert models[first["base_model_id"]]["test_ap_per_class"] == per_class_metrics(first_saved["base_metrics"])
    assert second["base_model_id"] == first["candidate_model_id"]  # round 2 started from the promoted model
    assert "promoted to" in loop["stdout"][0] and "not promoted" in loop["stdout"][1]


def test_promotion_copies_the_candidate_and_a_refusal_leaves_the_best_alone(loop):
    first_candidate = Path(json.loads((loop["rounds"][0] / "round.json").read_text())["candidate"])
    assert loop["best_after_round_1"] == sha256(first_candidate)
    assert sha256(loop["best"]) == loop["best_after_round_1"]
    assert not (loop["rounds"][1] / "base-grown.pt").exists()  # same classes: round 2 started from best.pt
    assert latest_valid_checkpoint(loop["rounds"][1])[1]["world_size"] == 2


def test_round_is_logged_to_an_offline_wandb_run(loop):
    (wandb_file,) = (loop["rounds"][0] / "decision" / "wandb").glob("offline-run-*/run-*.wandb")
    dump = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(wandb_file)],
                          capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr
    assert "improve/candidate_AP" in dump.stdout and "improve/promoted" in dump.stdout


def test_overriding_what_the_command_sets_is_refused_before_any_work(loop, tmp_path):
    result = subprocess.run(
        improve_command(0) + ["--base", str(loop["base"]), "--data", str(loop["new_data"]),
                              "--test-manifest", str(loop["new_data"]), "--db", str(tmp_path / "db"),
                              "--run-dir", str(tmp_path / "r"), "model.weights=other.pt"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "model.weights is set by --base" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("weights", "eps"), [("DEFAULT", 0.0), ("null", None)])
def test_a_round_builds_with_the_eps_its_base_was_trained_with(tmp_path, weights, eps):
    # torchvision's R50-FPN COCO_V1 file is loaded with FrozenBatchNorm2d eps 0: a round on a model fine-tuned
    # from it must keep that eps, which the base's state dict does not hold
    trained = load_config(None, ["model.name=fasterrcnn_resnet50_fpn", f"model.weights={weights}",
                                 "model.min_size=512"])
    base = {"config": config_to_dict(trained)}
    args = argparse.Namespace(config=DEFAULT_CONFIG, overrides=[], run_dir=tmp_path / "round", base=tmp_path / "b.pt")
    cfg = round_config(args, base, tmp_path / "manifest.json", tmp_path / "b.pt")
    assert (cfg.model.name, cfg.model.min_size, cfg.model.frozen_batchnorm_eps) == ("fasterrcnn_resnet50_fpn", 512, eps)
    assert cfg.model.weights == str(tmp_path / "b.pt")


def test_a_round_keeps_its_base_builder_kwargs_under_the_overrides(tmp_path):
    # representation_size shapes the box head's weights: a round that dropped it could not load its base
    trained = load_config(None, ["model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
                                 "model.builder_kwargs.representation_size=128",
                                 "model.builder_kwargs.box_batch_size_per_image=64"])
    args = argparse.Namespace(config=DEFAULT_CONFIG, overrides=["model.builder_kwargs.box_batch_size_per_image=32"],
                              run_dir=tmp_path / "round", base=tmp_path / "b.pt")
    cfg = round_config(args, {"config": config_to_dict(trained)}, tmp_path / "manifest.json", tmp_path / "b.pt")
    assert cfg.model.builder_kwargs.representation_size == 128
    assert cfg.model.builder_kwargs.box_batch_size_per_image == 32


@pytest.mark.parametrize("frozen_batchnorm", [True, False])
def test_extraction_and_the_round_rebuild_a_checkpoint_alike(small_manifest, tmp_path, monkeypatch, frozen_batchnorm):
    # both build through train/model.py: model_from_checkpoint, so both get the BatchNorm kind it was trained with
    path = write_checkpoint(small_manifest, tmp_path / "best.pt", frozen_batchnorm=frozen_batchnorm)
    evaluated = []
    monkeypatch.setattr(improve.round, "evaluate", lambda model, *args, **kwargs: evaluated.append(model.model) or {})
    cfg = load_config(None, [f"data.manifest={small_manifest}", "data.num_workers=0"])
    evaluate_checkpoint(path, small_manifest, "test", cfg, setup_strategy("single", "cpu"), tmp_path / "d.json")
    extracted = load_detector(path, score_threshold=0.5, max_detections=10).model

    for model in (extracted, *evaluated):
        kinds = {type(m) for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)}
        assert kinds == {FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d}
    assert tensor_hash(extracted.state_dict()) == tensor_hash(evaluated[0].state_dict())
