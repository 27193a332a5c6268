import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train.eval_plots import EvalPlots, write_eval_plots
from train.metrics import MetricsLogger
from train.pr_curves import curves_from_precision
from train.wandb_run import (
    RUN_ID_FILE_NAME,
    finish,
    log_detection_images,
    resolve_wandb_mode,
    start_wandb_run,
)

WANDB_CLI = Path(sys.executable).parent / "wandb"


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    return tmp_path / "netrc"


def test_mode_comes_from_config_then_env_then_credentials(no_wandb_credentials, monkeypatch):
    assert resolve_wandb_mode(None) == "offline"

    no_wandb_credentials.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_wandb_mode(None) == "online"
    no_wandb_credentials.write_text("machine example.com login user password secret\n")
    assert resolve_wandb_mode(None) == "offline"

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="wandb.mode"):
        resolve_wandb_mode("sometimes")


def _inspect_records(run_file: Path) -> list[dict]:
    result = subprocess.run(
        [str(WANDB_CLI), "leet", "inspect", "--json", str(run_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _history(records):
    return [record["history"]["item"] for record in records if record["type"] == "history"]


def _start(run_dir):
    return start_wandb_run(
        run_dir,
        cfg_dict={"seed": 7, "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn"}},
        mode=resolve_wandb_mode(None),
        project="product-attributes-test",
        group="tests",
        name="offline-check",
        extra_config={"strategy": "ddp", "world_size": 2, "gpu_names": []},
    )


def _eval_plots(run_dir):
    """An evaluation's figures of one class, as a test evaluation writes them."""
    precision = np.broadcast_to(np.linspace(1, 0, 101)[None, :, None, None, None], (10, 101, 1, 4, 3))
    curves = curves_from_precision(precision, np.linspace(0.5, 0.95, 10), np.linspace(0, 1, 101),
                                   ["all", "small", "medium", "large"], ["bottle"])
    return write_eval_plots(EvalPlots(run_dir, "val", 0.25), curves, np.array([[3, 1], [2, 0]]))


def _log_one_of_each(run, run_dir):
    """A train step, an evaluation with its figures and one image with a kept and a below-threshold box, then
    finish."""
    logger = MetricsLogger(run_dir, wandb_run=run, print_fn=lambda line: None)
    logger.log_train(
        step=5,
        epoch=0,
        images_seen=20,
        values={"loss": 1.25, "losses/loss_classifier": 0.5, "lr": 0.01, "phase": "heads"},
    )
    logger.log_eval(step=5, epoch=0, split="val", metrics={"map": 0.125}, plots=_eval_plots(run_dir))
    image = torch.zeros(3, 48, 64, dtype=torch.uint8)
    prediction = {
        "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [1.0, 1.0, 2.0, 2.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.05]),
    }
    log_detection_images(run, [image], [prediction], {1: "bottle", 2: "can"}, step=6, score_threshold=0.5)
    finish(run)
    logger.close()


def _check_logged_run(run_file: Path):
    """The offline run file holds the config, the train/eval history, the kept box and the step axes."""
    records = _inspect_records(run_file)
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["seed"] == 7 and config["strategy"] == "ddp" and config["world_size"] == 2
    history = _history(records)
    train = next(item for item in history if "train/loss" in item)
    assert train["train/loss"] == 1.25 and train["train/losses/loss_classifier"] == 0.5
    assert train["step"] == 5 and train["images_seen"] == 20 and train["_step"] == 5
    evaluation = next(item for item in history if "eval/val/map" in item)
    assert evaluation["eval/val/map"] == 0.125 and evaluation["_step"] == 5
    for name in ("pr_curves_val", "confusion_matrix_val", "ap_per_class_val"):
        key = f"plots/{name}"
        assert evaluation[f"{key}._type"] == "image-file" and evaluation[f"{key}.format"] == "png"
        logged = run_file.parent / "files" / evaluation[f"{key}.path"]
        assert logged.read_bytes() == (run_file.parents[2] / f"{name}.png").read_bytes()
    images = next(item for item in history if "eval/predictions.filenames" in item)
    assert images["_step"] == 6 and images["eval/predictions.width"] == 64
    boxes_file = images["eval/predictions.all_boxes"][0]["predictions"]["path"]
    boxes = json.loads((run_file.parent / "files" / boxes_file).read_text())
    assert boxes["box_data"] == [
        {
            "position": {"minX": 4.0, "minY": 6.0, "maxX": 30.0, "maxY": 40.0},
            "domain": "pixel",
            "class_id": 1,
            "box_caption": "bottle 0.90",
            "scores": {"score": pytest.approx(0.9)},
        }
    ]
    metric_axes = {
        r["metric"].get("glob_name") or r["metric"].get("name"): r["metric"].get("step_metric")
        for r in records
        if r["type"] == "metric"
    }
    assert metric_axes["train/*"] == "step" and metric_axes["eval/*"] == "step"
    assert metric_axes["images_seen"] == "step"


def test_offline_run_logs_metrics_and_images_and_reattaches_after_restart(no_wandb_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = no_wandb_credentials.parent / "run"

    run = _start(run_dir)
    run_id = run.id
    _log_one_of_each(run, run_dir)

    assert (run_dir / RUN_ID_FILE_NAME).read_text().strip() == run_id
    run_files = list(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    assert len(run_files) == 1
    _check_logged_run(run_files[0])

    # Offline run directories are named to the second; a real restart takes longer than that.
    time.sleep(1.0 - time.time() % 1.0)
    restarted = _start(run_dir)  # as after a torchrun restart
    assert restarted.id == run_id
    restarted.log({"train/loss": 0.75, "step": 9}, step=9)
    finish(restarted)
    run_files = sorted(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    assert len(run_files) == 2
    resumed_history = _history(_inspect_records(run_files[-1]))
    assert any(item.get("train/loss") == 0.75 and item["step"] == 9 for item in resumed_history)


def test_disabled_mode_starts_nothing(no_wandb_credentials):
    run_dir = no_wandb_credentials.parent / "run"
    run = start_wandb_run(run_dir, {}, "disabled", "p", None, None, {})
    assert run is None
    log_detection_images(run, [], [], {}, step=0)
    finish(run)
    assert not run_dir.exists()
