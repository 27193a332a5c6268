import json
import time

import pytest
import torch
from torch import nn

from train.metrics import METRICS_FILE_NAME, IntervalMeter, MetricsLogger


class ManualClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _losses(classifier, box):
    return {"loss_classifier": torch.tensor(classifier), "loss_box_reg": torch.tensor(box)}


def _step(meter, clock, wait_s, compute_s, images, losses):
    clock.now += wait_s
    meter.data_done(wait_s)
    clock.now += compute_s
    meter.step_done(losses, images=images)


def test_interval_summary_means_and_throughput_excluding_warmup():
    clock = ManualClock()
    meter = IntervalMeter(torch.device("cpu"), warmup_steps=2, clock=clock)
    syncs = []

    for step in range(5):  # steps 1-2 are warm-up; each takes 1 s, 0.25 s of it waiting for data
        _step(meter, clock, 0.25, 0.75, images=step + 1, losses=_losses(float(step), 1.0))
    summary = meter.summary(lambda: syncs.append(True))

    assert syncs == [True]
    assert summary["losses/loss_classifier"] == pytest.approx(2.0)  # mean of 0..4
    assert summary["losses/loss_box_reg"] == pytest.approx(1.0)
    assert summary["loss"] == pytest.approx(3.0)
    assert summary["nonfinite_steps"] == 0
    assert summary["images_per_s"] == pytest.approx((3 + 4 + 5) / 3.0)  # steps 3-5, after the end of step 2
    assert summary["data_wait_share"] == pytest.approx(0.25)
    assert summary["step_time_s"] == pytest.approx(1.0)
    assert summary["compute_time_s"] == pytest.approx(0.75)
    assert "max_memory_allocated_mb" not in summary  # CPU

    for _ in range(2):  # the next interval is measured from its start
        _step(meter, clock, 0.0, 0.5, images=8, losses=_losses(1.0, 2.0))
    second = meter.summary()
    assert second["images_per_s"] == pytest.approx(16 / 1.0)
    assert second["loss"] == pytest.approx(3.0)
    assert second["data_wait_share"] == 0.0


def test_nonfinite_steps_are_counted_and_left_out_of_the_means():
    clock = ManualClock()
    meter = IntervalMeter("cpu", warmup_steps=0, clock=clock)
    _step(meter, clock, 0.0, 1.0, 2, _losses(1.0, 3.0))
    _step(meter, clock, 0.0, 1.0, 2, _losses(float("nan"), 100.0))
    _step(meter, clock, 0.0, 1.0, 2, _losses(3.0, float("inf")))
    _step(meter, clock, 0.0, 1.0, 2, _losses(2.0, 3.0))
    summary = meter.summary()
    assert summary["nonfinite_steps"] == 2
    assert summary["losses/loss_classifier"] == pytest.approx(1.5)
    assert summary["losses/loss_box_reg"] == pytest.approx(3.0)
    assert summary["images_per_s"] == pytest.approx(2.0)  # skipped steps still processed their images

    _step(meter, clock, 0.0, 1.0, 2, _losses(float("nan"), 1.0))
    only_nonfinite = meter.summary()
    assert only_nonfinite["nonfinite_steps"] == 1 and "loss" not in only_nonfinite
    with pytest.raises(ValueError, match="loss components changed"):
        meter.step_done(_losses(1.0, 1.0), 2)
        meter.step_done({"loss_classifier": torch.tensor(1.0)}, 2)


def test_interval_made_only_of_warmup_steps_reports_no_throughput():
    clock = ManualClock()
    meter = IntervalMeter(torch.device("cpu"), warmup_steps=3, clock=clock)
    _step(meter, clock, 0.1, 0.9, 2, _losses(1.0, 1.0))
    summary = meter.summary()
    assert "images_per_s" not in summary and summary["loss"] == pytest.approx(2.0)
    assert meter.summary() == {}


def test_step_done_never_reads_loss_values():
    # Meta tensors have no data: any .item()/.tolist()/host comparison would raise.
    meter = IntervalMeter(torch.device("cpu"), warmup_steps=0)
    for _ in range(3):
        meter.data_done(0.0)
        loss = torch.ones((), device="meta", requires_grad=True) * 2
        meter.step_done({"loss_objectness": loss, "loss_rpn_box_reg": loss.detach()}, images=2)
    assert meter._loss_sums.device.type == "meta"


def test_meter_over_real_training_steps():
    torch.manual_seed(0)
    model = nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    meter = IntervalMeter(torch.device("cpu"), warmup_steps=1)
    losses_seen = []
    started = time.perf_counter()
    for _ in range(4):
        wait_start = time.perf_counter()
        inputs = torch.randn(8, 16)
        time.sleep(0.01)  # a loader that makes the step wait
        meter.data_done(time.perf_counter() - wait_start)
        loss = model(inputs).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses_seen.append(loss.item())
        meter.step_done({"mse": loss}, images=8)
    summary = meter.summary()
    elapsed = time.perf_counter() - started

    assert summary["losses/mse"] == pytest.approx(sum(losses_seen) / 4, rel=1e-6)
    assert 0.0 < summary["data_wait_share"] < 1.0 and summary["compute_time_s"] > 0
    assert summary["images_per_s"] > 24 / elapsed  # 3 post-warm-up steps in less than the whole time


def _read_records(run_dir):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    lines = (run_dir / METRICS_FILE_NAME).read_text().splitlines()
    return [json.loads(line, parse_constant=reject) for line in lines]


class FixedGpuStats:
    def snapshot(self):
        return {"gpu/0/util": 87.5, "gpu/0/power_w": 301.0}


class RecordingRun:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))


def test_logger_writes_jsonl_console_and_wandb(tmp_path):
    lines, run = [], RecordingRun()
    logger = MetricsLogger(tmp_path, wandb_run=run, gpu_stats=FixedGpuStats(), print_fn=lines.append)
    values = {
        "loss": 0.5,
        "losses/loss_classifier": 0.3,
        "lr": 0.02,
        "images_per_s": 12.5,
        "data_wait_share": 0.1,
        "phase": "heads",
    }

    logger.log_train(step=10, epoch=0, images_seen=40, values=values)
    # Once written, a record is on disk, before the logger is closed.
    assert _read_records(tmp_path)[0]["step"] == 10
    logger.log_eval(step=10, epoch=0, split="val", metrics={"map": 0.25, "per_class": {"bottle": 0.5}})
    logger.log_event("nonfinite_loss", step=11, loss=float("nan"))
    logger.close()

    train, evaluation, event = _read_records(tmp_path)
    assert train["kind"] == "train" and train["images_seen"] == 40 and train["epoch"] == 0
    assert train["losses/loss_classifier"] == 0.3 and train["phase"] == "heads"
    assert train["gpu/0/util"] == 87.5
    assert evaluation["kind"] == "eval" and evaluation["split"] == "val" and evaluation["images_seen"] == 40
    assert evaluation["per_class"] == {"bottle": 0.5}
    assert event["kind"] == "event" and event["event"] == "nonfinite_loss" and event["loss"] == "nan"
    assert all(isinstance(record["time"], float) for record in (train, evaluation, event))

    assert lines[0] == "step 10 | epoch 0 | loss 0.5000 | lr 2.00e-02 | img/s 12.5 | data 10% | phase heads"
    assert lines[1].startswith("eval val step 10 epoch 0: map 0.25")
    assert lines[2] == "[nonfinite_loss] step=11 loss=nan"

    (train_step, train_logged), (eval_step, eval_logged) = run.logged
    assert train_step == 10 and train_logged["train/loss"] == 0.5 and train_logged["images_seen"] == 40
    assert train_logged["step"] == 10 and "train/phase" not in train_logged
    assert train_logged["gpu/0/power_w"] == 301.0
    assert eval_step == 10 and eval_logged["eval/val/map"] == 0.25
    assert eval_logged["eval/val/per_class/bottle"] == 0.5


def test_per_class_eval_metrics_go_to_a_console_table_and_to_every_sink_by_key(tmp_path):
    lines, run = [], RecordingRun()
    logger = MetricsLogger(tmp_path, wandb_run=run, print_fn=lines.append)
    metrics = {"AP": 0.5, "AP50": 0.75, "AP/bottle": 1.0, "AP50/bottle": 1.0, "gt_boxes/bottle": 12,
               "AP/shopping bag": float("nan"), "AP50/shopping bag": float("nan"), "gt_boxes/shopping bag": 0}
    logger.log_eval(step=5, epoch=1, split="test", metrics=metrics, images_seen=20)
    logger.close()

    assert "\n".join(lines).splitlines() == [
        "eval test step 5 epoch 1: AP 0.5 AP50 0.75",
        "class               AP      AP50  gt_boxes",
        "bottle           1.000     1.000        12",
        "shopping bag       nan       nan         0",
    ]
    [record] = _read_records(tmp_path)
    assert record["AP/bottle"] == 1.0 and record["gt_boxes/bottle"] == 12 and record["AP50/shopping bag"] == "nan"
    [(_, logged)] = run.logged
    assert logged["eval/test/AP/bottle"] == 1.0 and logged["eval/test/AP50/bottle"] == 1.0
    assert logged["eval/test/gt_boxes/shopping bag"] == 0


def test_logger_appends_after_resume(tmp_path):
    first = MetricsLogger(tmp_path, print_fn=lambda line: None)
    first.log_train(1, 0, 4, {"loss": torch.tensor(2.0)})
    first.close()
    second = MetricsLogger(tmp_path, print_fn=lambda line: None)
    second.log_event("resume", step=1, checkpoint="checkpoint-00000001.pt")
    second.close()
    records = _read_records(tmp_path)
    assert [r["kind"] for r in records] == ["train", "event"] and records[0]["loss"] == 2.0


def test_disabled_logger_on_other_ranks_writes_nothing(tmp_path, capsys):
    run = RecordingRun()
    logger = MetricsLogger(tmp_path / "run", enabled=False, wandb_run=run)
    logger.log_train(1, 0, 4, {"loss": 1.0})
    logger.log_eval(1, 0, "val", {"map": 0.1})
    logger.log_event("resume", step=1)
    logger.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == "" and run.logged == []


def test_an_evaluation_of_earlier_weights_reaches_wandb_at_its_own_chart_step(tmp_path):
    """best.pt's test metrics come after the final step: wandb drops a lower step, so they go out at the latest
    wandb step and carry the step of the weights they measured, which the charts plot them at."""
    run = RecordingRun()
    logger = MetricsLogger(tmp_path, wandb_run=run, print_fn=lambda line: None)
    logger.log_eval(step=30, epoch=3, split="test", metrics={"AP": 0.4}, images_seen=120)
    logger.log_eval(step=20, epoch=2, split="test", metrics={"AP": 0.5}, images_seen=80)
    logger.close()

    (final_step, final), (best_step, best) = run.logged
    assert (final_step, final["step"], final["eval/test/AP"]) == (30, 30, 0.4)
    assert (best_step, best["step"], best["images_seen"], best["eval/test/AP"]) == (30, 20, 80, 0.5)
    assert [record["step"] for record in _read_records(tmp_path)] == [30, 20]
