"""The training entry point for real: torchrun with 2 gloo processes, resume, restart, strategies (the loop's
steps in process: tests/test_loop.py)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shard_synthetic_set
from torchvision.models import detection

from train.checkpoint import latest_valid_checkpoint, load_checkpoint, tensor_hash
from train.eval_plots import PLOT_NAMES
from train.main import main as train_main
from train.model import model_from_checkpoint
from train.run_checkpoint import KILL_BEFORE_CHECKPOINT_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The reference run and the runs compared with it: step checkpoints to resume from, and the weights' EMA, whose
# decay warms up within the run's 22 steps
REFERENCE = ["checkpoint.every_steps=3", "train.ema_decay=0.9", "train.ema_tau=4"]


def tiny_overrides(manifest: Path, run_dir: Path) -> list[str]:
    return [
        f"data.manifest={manifest}", f"run_dir={run_dir}",
        "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=96", "model.max_size=128",
        "model.frozen_batchnorm=false", "data.batch_size=2", "data.num_workers=0", "optim.lr=0.01",
        "optim.warmup_steps=2", "optim.schedule=cosine", "train.log_every=2", "train.epochs=2",
        "eval.every_epochs=1", "wandb.mode=offline",
    ]


def run_training(overrides: list[str], nproc: int = 2, max_restarts: int = 0, check: bool = True,
                 extra_env: dict[str, str] | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    if nproc:
        # --standalone: a rendezvous store on a free port, so test runs in parallel never meet
        command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
                   f"--max-restarts={max_restarts}", "train/main.py"]
    else:
        command = [sys.executable, "train/main.py"]
    result = subprocess.run(command + overrides, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        raise AssertionError(f"training failed ({result.returncode}):\n{output}")
    return result


def final_weights_hash(run_dir: Path) -> str:
    """The last checkpoint's weights: the deployable ones, and with an EMA the trained ones and its count too."""
    path, state = latest_valid_checkpoint(run_dir)
    return tensor_hash([state["model"], state["training_model"], state["ema_updates"]])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted_run(small_manifest, module_dir):
    """The reference: 2 processes, 2 epochs, with an EMA, every artefact written."""
    run_dir = module_dir / "reference"
    result = run_training(tiny_overrides(small_manifest, run_dir) + REFERENCE)
    return run_dir, result


def test_ddp_run_writes_checkpoints_metrics_and_wandb(uninterrupted_run):
    run_dir, result = uninterrupted_run
    assert (run_dir / "config.yaml").exists() and (run_dir / "best.pt").exists()
    path, state = latest_valid_checkpoint(run_dir)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["progress"]["epoch"] == 2
    assert {c["category_id"] for c in state["categories"]} == {1, 3, 4, 7, 9}
    logged = records(run_dir)
    train = [r for r in logged if r.get("kind") == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train) and train[-1]["images_per_s"] > 0
    assert {"images_per_s/rank0", "images_per_s/rank1", "data_wait_share", "lr"} <= set(train[-1])
    evals = [r for r in logged if r.get("kind") == "eval"]
    assert {r["split"] for r in evals} == {"val", "test"} and all("AP50" in r for r in evals)
    names = [c["name"] for c in state["categories"]]
    assert all({f"AP/{name}" for name in names} | {f"AP50/{name}" for name in names} <= set(r) for r in evals)
    # the per-class table comes from rank 0 alone: once per evaluation, not once per rank
    assert len(re.findall(r"^class +AP +AP50 +gt_boxes$", result.stdout, flags=re.MULTILINE)) == len(evals)
    detections = json.loads((run_dir / "detections_test.json").read_text())
    assert isinstance(detections, list)
    # best.pt records the test metrics of its own weights (reused when the last epoch was the best)
    best = load_checkpoint(run_dir / "best.pt")
    assert {"AP", "AP50"} <= set(best["test_metrics"]) and f"AP/{names[0]}" in best["test_metrics"]
    if best["progress"]["step"] == state["progress"]["step"]:
        assert repr(best["test_metrics"]) == repr(state["test_metrics"])
    else:
        assert isinstance(json.loads((run_dir / "detections_test_best.json").read_text()), list)
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1
    dump = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(wandb_files[0])],
                          capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr
    assert "images_per_s" in dump.stdout and '"strategy"' in dump.stdout
    assert f"eval/test/AP/{names[0]}" in dump.stdout and f"eval/val/AP50/{names[-1]}" in dump.stdout
    assert "eval/predictions" in dump.stdout  # validation images with predicted boxes
    # the test evaluation's figures, beside metrics.jsonl and in wandb (validation draws none)
    assert all((run_dir / f"{name}_test.png").stat().st_size > 0 for name in PLOT_NAMES)
    assert not list(run_dir.glob("*_val.png")) and '"plots/pr_curves_test.path"' in dump.stdout
    assert "run directory:" in result.stdout


def test_ddp_run_evaluates_and_deploys_the_ema(uninterrupted_run):
    run_dir, _ = uninterrupted_run
    _, state = latest_valid_checkpoint(run_dir)
    assert state["ema_updates"] == state["progress"]["step"] > 0
    assert tensor_hash(state["model"]) != tensor_hash(state["training_model"])
    assert all(value.dtype == torch.float32 for value in state["model"].values() if value.is_floating_point())
    assert len(set(state["replica_hashes"])) == 1  # every rank holds the same weights and the same EMA
    # whatever deploys best.pt builds the average, the weights its test metrics measured
    best = load_checkpoint(run_dir / "best.pt")
    model, _ = model_from_checkpoint(best, run_dir / "best.pt")
    assert tensor_hash(model.state_dict()) == tensor_hash(best["model"]) != tensor_hash(best["training_model"])


def test_resume_after_a_stop_is_bitwise_identical_ema_included(uninterrupted_run, small_manifest, tmp_path):
    reference_dir, _ = uninterrupted_run
    overrides = tiny_overrides(small_manifest, tmp_path) + REFERENCE
    run_training(overrides + ["train.max_steps=4"])  # stops mid-epoch 0
    assert latest_valid_checkpoint(tmp_path)[1]["progress"]["step"] == 4
    run_training(overrides)
    assert final_weights_hash(tmp_path) == final_weights_hash(reference_dir)  # trained weights, EMA and its count


def test_killed_worker_is_restarted_and_finishes_identically(uninterrupted_run, small_manifest, tmp_path):
    reference_dir, _ = uninterrupted_run
    overrides = tiny_overrides(small_manifest, tmp_path) + REFERENCE
    # rank 1 dies just before the checkpoint of step 9: steps 7 to 9 are lost and trained again from step 6
    result = run_training(overrides, max_restarts=1, extra_env={KILL_BEFORE_CHECKPOINT_ENV: "1:9"})
    assert "resumed from" in result.stdout
    assert final_weights_hash(tmp_path) == final_weights_hash(reference_dir)


def test_early_stopping_stops_every_rank_together(small_manifest, tmp_path):
    """With lr 0 (and BatchNorm frozen) the weights never move, so the validation AP cannot improve after the
    first validation: patience 1 ends the run after the second, on both ranks, and the test at the end still
    measures the final weights and best.pt's."""
    overrides = tiny_overrides(small_manifest, tmp_path) + [
        "optim.lr=0", "model.frozen_batchnorm=true", "train.epochs=3", "train.patience=1",
        "model.builder_kwargs.representation_size=64", "model.builder_kwargs.box_batch_size_per_image=64"]  # faster
    run_training(overrides)
    logged = records(tmp_path)
    [stop] = [r for r in logged if r.get("event") == "early_stop"]
    assert (stop["epoch"], stop["evals_since_improvement"], stop["patience"]) == (2, 1, 1)
    assert [(r["split"], r["epoch"]) for r in logged if r.get("kind") == "eval"] == [
        ("val", 1), ("val", 2), ("test", 2), ("test", 1)]
    _, state = latest_valid_checkpoint(tmp_path)
    assert state["progress"]["epoch"] == 2 and state["test_metrics"] is not None
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["progress"]["epoch"] == 1 and repr(best["test_metrics"]) == repr(state["test_metrics"])  # same weights
    [wandb_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    dump = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(wandb_file)],
                          capture_output=True, text=True, timeout=120)
    assert "event/early_stop/evals_since_improvement" in dump.stdout


def test_phase_change_under_ddp_keeps_replicas_identical(small_manifest, tmp_path):
    phases = ("freeze.phases=[{name: heads, start_step: 0, train: [rpn, roi_heads]},"
              " {name: all, start_step: 3, train: ['*']}]")
    overrides = tiny_overrides(small_manifest, tmp_path) + [phases, "train.max_steps=6", "checkpoint.every_steps=3",
                                                            "checkpoint.keep_last=5", "eval.every_epochs=0",
                                                            "model.frozen_batchnorm=true"]
    run_training(overrides)
    at_3 = load_checkpoint(tmp_path / "checkpoint-00000003.pt")
    at_6 = load_checkpoint(tmp_path / "checkpoint-00000006.pt")
    events = [r for r in records(tmp_path) if r.get("event") == "phase"]
    assert [e["phase"] for e in events[:2]] == ["heads", "all"]
    assert events[0]["trainable_parameters"] < events[1]["trainable_parameters"]
    body = [k for k in at_3["model"] if k.startswith("backbone.body") and at_3["model"][k].is_floating_point()]
    initial = run_training_initial_weights(small_manifest, tmp_path / "initial")
    assert all(torch.equal(at_3["model"][k], initial[k]) for k in body), "frozen weights moved in phase 1"
    assert any(not torch.equal(at_6["model"][k], at_3["model"][k]) for k in body), "phase 2 did not train the body"
    assert len(set(at_6["replica_hashes"])) == 1


def run_training_initial_weights(manifest: Path, run_dir: Path) -> dict:
    """The model as built, before any step: a run stopped at step 0 checkpoints it."""
    overrides = ["train.max_steps=0", "eval.test_at_end=false", "model.frozen_batchnorm=true"]
    run_training(tiny_overrides(manifest, run_dir) + overrides, nproc=0)
    return latest_valid_checkpoint(run_dir)[1]["model"]


# main's torchrun @record wants a real stderr for its fault handler; under capsys it has none and says so
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_a_manifest_without_val_trains_when_the_run_does_not_validate(tmp_path, capsys):
    """Training reads only the splits it uses; a run that would validate says which option to change."""
    manifest = shard_synthetic_set(tmp_path / "data", num_images=24, image_size=96, shard_max_count=7,
                                   splits="train=0.75,test=0.25")
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(manifest, run_dir), "strategy=single", "wandb.mode=disabled", "train.max_steps=2"]

    assert train_main(overrides) == 2  # eval.every_epochs=1 in tiny_overrides: validation needs the val split
    error = capsys.readouterr().err
    assert "no split 'val'" in error and "eval.every_epochs=0 trains without it" in error
    assert not run_dir.exists()

    assert train_main([*overrides, "eval.every_epochs=0"]) == 0
    state = load_checkpoint(latest_valid_checkpoint(run_dir)[0])
    assert state["progress"]["step"] == 2 and math.isfinite(state["test_metrics"]["AP"])


def test_bad_config_key_fails_before_work(small_manifest, tmp_path):
    result = run_training(tiny_overrides(small_manifest, tmp_path) + ["optim.lrr=0.1"], nproc=0, check=False)
    assert result.returncode == 2 and "optim.lrr" in result.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_weights_by_name_load_from_the_cache_into_the_run(small_manifest, tmp_path):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    cached = Path(os.environ["TORCH_HOME"], "hub", "checkpoints", "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth")
    cached.parent.mkdir(parents=True)
    torch.manual_seed(5)
    coco = {k: v for k, v in detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights_backbone=None).state_dict().items()
            if not k.endswith("num_batches_tracked")}
    torch.save(coco, cached)
    overrides = tiny_overrides(small_manifest, tmp_path) + [
        f"model.name={name}", "model.weights=DEFAULT", "model.frozen_batchnorm=true", "train.max_steps=0",
        "eval.test_at_end=false"]
    result = run_training(overrides, nproc=0)
    assert f"weights FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1 ({cached}): loaded" in result.stdout
    _, state = latest_valid_checkpoint(tmp_path)
    assert all(torch.equal(state["model"][k], v) for k, v in coco.items() if not k.startswith("roi_heads.box_pre"))


def test_weights_that_cannot_be_downloaded_stop_every_rank_with_one_message(small_manifest, tmp_path):
    # An empty torch.hub cache (tests/conftest.py) and a proxy that refuses connections: the download fails at
    # once without leaving the machine.
    with socket.create_server(("127.0.0.1", 0)) as closed:
        refusing_proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "https_proxy": refusing_proxy, "HTTPS_PROXY": refusing_proxy,
           "no_proxy": "", "NO_PROXY": ""}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "train/main.py",
               *tiny_overrides(small_manifest, tmp_path), "model.weights=DEFAULT"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("weights error: model.weights: DEFAULT is torchvision's") == 1, result.stderr[-3000:]
    assert "put it at: " + os.environ["TORCH_HOME"] in result.stderr and "Connection refused" in result.stderr
    # the workers exit with 2 (the first one to end makes torchrun stop the other); the only traceback is
    # torchrun's own report of that, none from our code or urllib
    assert "exitcode  : 2" in result.stderr and result.stderr.count("Traceback") <= 1
    assert "urllib/request.py" not in result.stderr and f'File "{ROOT / "train"}' not in result.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_unknown_weights_name_is_a_config_error(small_manifest, tmp_path):
    result = run_training(tiny_overrides(small_manifest, tmp_path) + ["model.weights=COCO_V2"], nproc=0, check=False)
    assert result.returncode == 2 and "config error: model.weights: 'COCO_V2' is neither" in result.stderr


def test_dp_and_single_train_the_same_config_identically(small_manifest, tmp_path):
    common = tiny_overrides(small_manifest, tmp_path) + ["train.max_steps=3", "eval.every_epochs=0",
                                                         "eval.test_at_end=false"]
    hashes = {}
    for strategy in ("single", "dp"):
        run_dir = tmp_path / strategy
        run_training(common + [f"strategy={strategy}", f"run_dir={run_dir}"], nproc=0)
        hashes[strategy] = final_weights_hash(run_dir)
    # without GPUs DataParallel runs the module itself: same data, same batch, same weights
    assert hashes["single"] == hashes["dp"]


def test_unfreezing_under_a_live_ddp_wrapper_is_caught(tmp_path):
    """The hazard is real (gradients of parameters unfrozen after wrapping are never all-reduced) and the
    replica check that runs at every checkpoint catches it; re-wrapping, as the trainer does, prevents it."""
    result = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "tests/_drift_worker.py"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rewrap=False: diverged" in result.stdout
    assert "rewrap=True: identical" in result.stdout


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_checkpoints_the_fp16_scaler(small_manifest, tmp_path, amp):
    overrides = tiny_overrides(small_manifest, tmp_path) + [
        f"train.amp={amp}", "train.max_steps=3", "train.log_every=1", "train.throughput_warmup_steps=0",
        "eval.every_epochs=0", "eval.test_at_end=false"]
    run_training(overrides, nproc=0)
    _, state = latest_valid_checkpoint(tmp_path)
    assert state["progress"]["step"] == 3
    assert (state["scaler"] is not None) == (amp == "fp16")
    losses = [r["loss"] for r in records(tmp_path) if r.get("kind") == "train"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def test_gradient_accumulation_under_ddp(small_manifest, tmp_path):
    overrides = tiny_overrides(small_manifest, tmp_path) + [
        "optim.accumulate_steps=2", "train.max_steps=2", "eval.every_epochs=0", "eval.test_at_end=false"]
    run_training(overrides)
    _, state = latest_valid_checkpoint(tmp_path)
    progress = state["progress"]
    # 2 optimizer steps of 2 micro-batches of 2 images on each of 2 ranks
    assert progress["step"] == 2 and progress["samples_in_epoch"] == 8 and progress["images_seen"] == 16
    assert len(set(state["replica_hashes"])) == 1


def test_channels_last_and_cudnn_benchmark_options_train(small_manifest, tmp_path):
    """The GPU speed options run on any device (torch.compile of the backbone works too but takes minutes on
    the CPU, so it is left to the GPU benchmark)."""
    overrides = tiny_overrides(small_manifest, tmp_path) + [
        "train.channels_last=true", "train.cudnn_benchmark=true", "train.max_steps=2", "eval.every_epochs=0",
        "eval.test_at_end=false"]
    run_training(overrides, nproc=0)
    _, state = latest_valid_checkpoint(tmp_path)
    assert state["progress"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
