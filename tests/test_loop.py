"""The training loop in process: the single strategy on the CPU, real shards, a tiny stand-in detector.

Accumulation windows, skipped non-finite steps, phase changes with a rebuilt wrapper, the resume round trip,
the test metrics the final checkpoint and best.pt record, the weights' EMA and early stopping. The torchrun runs
are in tests/test_train.py.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import train.loop
from data_prep.manifest import manifest_classes
from train.checkpoint import latest_valid_checkpoint, load_checkpoint, tensor_hash
from train.config import load_config
from train.ema import ModelEma
from train.loop import NonFiniteLossError, Splits, Trainer
from train.metrics import MetricsLogger
from train.optim import build_lr_schedule, build_optimizer
from train.readers import steps_per_epoch
from train.run_checkpoint import Progress, resume_run
from train.shard_reader import samples_per_rank, split_shards
from train.strategy import Strategy, setup_strategy


class TinyDetector(nn.Module):
    """Stands in for a torchvision detector in training mode: images and targets in, a dict of losses out.

    Each forward pass records whether it ran under `no_sync` (which the loop uses, as it would DDP's, for every
    micro-batch of a window but the last) and whether the backbone trained. The forward passes numbered (from 0)
    in `nonfinite_calls` return NaN losses.
    """

    def __init__(self, nonfinite_calls=()):
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.roi_heads = nn.Linear(4, 1)
        self.nonfinite_calls = set(nonfinite_calls)
        self.calls: list[dict] = []
        self._in_no_sync = False

    @contextmanager
    def no_sync(self):
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False

    def forward(self, images, targets):
        self.calls.append({"synced": not self._in_no_sync, "backbone_trains": self.backbone.weight.requires_grad})
        features = torch.stack([image.mean(dim=(1, 2)) for image in images])
        predicted = self.roi_heads(torch.relu(self.backbone(features))).squeeze(1)
        box_counts = torch.tensor([float(len(target["boxes"])) for target in targets])
        loss = (predicted - box_counts).square().mean()
        if len(self.calls) - 1 in self.nonfinite_calls:
            loss = loss * float("nan")
        return {"loss_count": loss, "loss_scale": 1e-3 * self.roi_heads.weight.square().sum()}


def make_trainer(manifest: Path, run_dir: Path, model: nn.Module, overrides: list[str] = ()) -> Trainer:
    """What train/training.py assembles, around the given model."""
    cfg = load_config(None, [
        f"data.manifest={manifest}", f"run_dir={run_dir}", "strategy=single", "device=cpu", "data.batch_size=2",
        "data.num_workers=0", "optim.lr=0.01", "optim.warmup_steps=0", "optim.schedule=constant",
        "train.epochs=1", "train.log_every=1", "eval.every_epochs=0", "eval.test_at_end=false",
        "checkpoint.keep_last=100", "wandb.mode=disabled", *overrides,
    ])
    strategy = setup_strategy(cfg.strategy, cfg.device)
    splits = Splits(*(split_shards(manifest, name) for name in ("train", "val", "test")))
    optimizer = build_optimizer(cfg.optim, model, cfg.optim.lr)
    lr_schedule = build_lr_schedule(cfg.optim, optimizer, steps_per_epoch=100, total_steps=100)
    logger = MetricsLogger(run_dir)
    ema = ModelEma(model, cfg.train.ema_decay, cfg.train.ema_tau) if cfg.train.ema_decay is not None else None
    return Trainer(cfg, strategy, model, optimizer, lr_schedule, None, splits, manifest_classes(manifest), logger,
                   Progress(), ema)


@pytest.fixture
def make(small_manifest, tmp_path):
    trainers = []

    def build(model: nn.Module, overrides: list[str] = ()) -> Trainer:
        trainers.append(make_trainer(small_manifest, tmp_path, model, overrides))
        return trainers[-1]

    yield build
    for trainer in trainers:
        trainer.logger.close()


def batches_per_epoch(trainer: Trainer) -> int:
    return -(-samples_per_rank(trainer.splits.train, rank=0, world_size=1, training=True)
             // trainer.cfg.data.batch_size)


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("event") == name]


def checkpoint_at(run_dir: Path, step: int) -> dict:
    return load_checkpoint(run_dir / f"checkpoint-{step:08d}.pt")


def test_optimizer_steps_end_each_accumulation_window_and_the_epoch(make, tmp_path):
    model = TinyDetector()
    trainer = make(model, ["optim.accumulate_steps=3"])
    batches = batches_per_epoch(trainer)
    assert batches % 3, "the epoch should end with a partial window"
    window_ends = []
    trainer.optimizer.register_step_post_hook(lambda *_: window_ends.append(len(model.calls)))
    trainer.fit()
    expected_ends = [*range(3, batches, 3), batches]
    assert window_ends == expected_ends
    assert trainer.progress.step == len(expected_ends) == -(-batches // 3)
    assert trainer.progress.step == steps_per_epoch(trainer.splits.train, world_size=1,
                                                    loader_batch_size=trainer.cfg.data.batch_size,
                                                    accumulate_steps=3)
    # gradients are synchronised on the last micro-batch of each window only
    assert [index + 1 for index, call in enumerate(model.calls) if call["synced"]] == expected_ends
    samples = samples_per_rank(trainer.splits.train, rank=0, world_size=1, training=True)
    assert trainer.progress.epoch == 1 and trainer.progress.images_seen == samples


def test_a_nonfinite_step_is_skipped_and_training_goes_on(make, tmp_path):
    trainer = make(TinyDetector(nonfinite_calls={1}), ["train.max_steps=4", "checkpoint.every_steps=1"])
    trainer.fit()
    assert [record["step"] for record in events(tmp_path, "nonfinite_step_skipped")] == [2]
    before, skipped, after = (checkpoint_at(tmp_path, step) for step in (1, 2, 3))
    # no update: weights, optimizer state and schedule are those of step 1
    assert tensor_hash(skipped["model"]) == tensor_hash(before["model"])
    assert tensor_hash(skipped["optimizer"]) == tensor_hash(before["optimizer"])
    assert skipped["lr_schedule"]["last_epoch"] == before["lr_schedule"]["last_epoch"]
    assert skipped["progress"]["nonfinite_in_a_row"] == 1
    assert tensor_hash(after["model"]) != tensor_hash(skipped["model"])
    assert after["progress"]["nonfinite_in_a_row"] == 0 and trainer.progress.step == 4


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(make, tmp_path):
    trainer = make(TinyDetector(nonfinite_calls=range(1, 100)),
                   ["train.max_nonfinite_steps=3", "checkpoint.every_steps=1"])
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row"):
        trainer.fit()
    assert [record["step"] for record in events(tmp_path, "nonfinite_step_skipped")] == [2, 3, 4]
    path, state = latest_valid_checkpoint(tmp_path)
    assert path.name == "checkpoint-00000003.pt"
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_phase_change_sets_requires_grad_and_rebuilds_the_wrapper(make, tmp_path, monkeypatch):
    phases = ("freeze.phases=[{name: heads, start_step: 0, train: [roi_heads]},"
              " {name: all, start_step: 3, train: ['*']}]")
    model = TinyDetector()
    initial_backbone = model.backbone.weight.detach().clone()
    wrapped = []
    real_wrap = Strategy.wrap
    monkeypatch.setattr(Strategy, "wrap", lambda self, module: wrapped.append(module) or real_wrap(self, module))
    trainer = make(model, [phases, "train.max_steps=5", "checkpoint.every_steps=1"])
    trainer.fit()
    assert [call["backbone_trains"] for call in model.calls] == [False] * 3 + [True] * 2
    assert len(wrapped) == 2 and all(module is model for module in wrapped)  # built, then rebuilt at step 3
    assert [(e["phase"], e["step"]) for e in events(tmp_path, "phase")] == [("heads", 0), ("all", 3)]
    assert torch.equal(checkpoint_at(tmp_path, 3)["model"]["backbone.weight"], initial_backbone)
    assert not torch.equal(checkpoint_at(tmp_path, 4)["model"]["backbone.weight"], initial_backbone)
    # the checkpoint of step 3 is written before the change; a resume from it applies the phase again
    assert [checkpoint_at(tmp_path, step)["progress"]["phase"] for step in (3, 4)] == [0, 1]


def test_resume_restores_what_the_checkpoint_saved(make, tmp_path):
    overrides = ["train.max_steps=3", "train.ema_decay=0.9", "train.ema_tau=1"]
    trainer = make(TinyDetector(), overrides)
    trainer.fit()
    model = TinyDetector()
    fresh = make(model, overrides)
    progress = resume_run(fresh.cfg, fresh.strategy, model, fresh.optimizer, fresh.lr_schedule, None, fresh.ema)
    assert progress == trainer.progress and progress.step == 3
    assert tensor_hash(model.state_dict()) == tensor_hash(trainer.model_without_ddp.state_dict())
    assert tensor_hash(fresh.optimizer.state_dict()) == tensor_hash(trainer.optimizer.state_dict())
    assert fresh.lr_schedule.state_dict() == trainer.lr_schedule.state_dict()
    assert fresh.ema.updates == trainer.ema.updates == 3
    assert tensor_hash(fresh.ema.weights) == tensor_hash(trainer.ema.weights) != tensor_hash(model.state_dict())
    # a run resumed without the option trains on from the trained weights, not from the average
    plain = make(TinyDetector(), ["train.max_steps=3"])
    resume_run(plain.cfg, plain.strategy, plain.model_without_ddp, plain.optimizer, plain.lr_schedule, None)
    assert tensor_hash(plain.model_without_ddp.state_dict()) == tensor_hash(model.state_dict())


def weights_ap(weights: dict) -> float:
    """The stand-in evaluation's test "AP": a number that differs whenever the evaluated weights do."""
    return float(weights["roi_heads.weight"].sum())


@pytest.fixture
def scripted_evaluation(monkeypatch):
    """Validation APs from a script (so the test decides which epoch is best); test AP from the weights."""
    calls = {"val": [], "test": []}

    def fake_evaluate(model, loader, classes, strategy, device, out_path, **kwargs):
        split = "val" if out_path.name.startswith("detections_val") else "test"
        calls[split].append(out_path.name)
        calls.setdefault("weights", []).append(tensor_hash(model.state_dict()))
        if split == "val":
            return {"AP": calls["script"][len(calls["val"]) - 1]}
        return {"AP": weights_ap(model.state_dict())}

    monkeypatch.setattr(train.loop, "evaluate", fake_evaluate)
    return calls


def test_best_checkpoint_records_the_test_metrics_of_its_own_weights(make, tmp_path, scripted_evaluation):
    scripted_evaluation["script"] = [0.5, 0.1]  # the first epoch is the best
    trainer = make(TinyDetector(), ["train.epochs=2", "eval.every_epochs=1"])
    trainer.fit()
    best_before = load_checkpoint(tmp_path / "best.pt")
    trainer.test_final_and_best()
    _, final = latest_valid_checkpoint(tmp_path)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["progress"]["step"] < final["progress"]["step"]
    assert final["test_metrics"] == {"AP": weights_ap(final["model"])}
    assert best["test_metrics"] == {"AP": weights_ap(best["model"])} != final["test_metrics"]
    assert scripted_evaluation["test"] == ["detections_test.json", "detections_test_best.json"]
    # best.pt is otherwise unchanged, and the model has its final weights back
    assert tensor_hash({**best, "test_metrics": None}) == tensor_hash(best_before)
    assert tensor_hash(trainer.model_without_ddp.state_dict()) == tensor_hash(final["model"])
    # each test evaluation is logged at the step (and images seen) of the weights it measured
    test_records = [(r["step"], r["images_seen"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                    .splitlines()) if r.get("split") == "test"]
    assert test_records[1] == (best["progress"]["step"], best["progress"]["images_seen"])
    assert test_records[0][0] == final["progress"]["step"]


def test_a_best_last_epoch_reuses_the_final_test_metrics(make, tmp_path, scripted_evaluation):
    scripted_evaluation["script"] = [0.1, 0.5]  # the last epoch is the best
    trainer = make(TinyDetector(), ["train.epochs=2", "eval.every_epochs=1"])
    trainer.fit()
    trainer.test_final_and_best()
    _, final = latest_valid_checkpoint(tmp_path)
    best = load_checkpoint(tmp_path / "best.pt")
    assert scripted_evaluation["test"] == ["detections_test.json"]  # one test evaluation
    assert best["progress"]["step"] == final["progress"]["step"]
    assert best["test_metrics"] == final["test_metrics"] == {"AP": weights_ap(final["model"])}


def test_the_ema_moves_once_per_optimizer_step_and_is_what_is_evaluated_and_saved(make, tmp_path,
                                                                                   scripted_evaluation):
    scripted_evaluation["script"] = [0.5]
    model = TinyDetector(nonfinite_calls={1})  # the first window's second micro-batch: step 1 is skipped
    trainer = make(model, ["optim.accumulate_steps=2", "train.ema_decay=0.8", "train.ema_tau=0",
                           "eval.every_epochs=1"])
    averaged = []
    real_update = trainer.ema.update
    trainer.ema.update = lambda module: averaged.append(trainer.progress.step) or real_update(module)
    trainer.fit()
    trainer.test_final_and_best()
    steps = trainer.progress.step
    assert len(model.calls) > steps > 2
    assert averaged == list(range(1, steps))  # once per taken optimizer step, before the counter moves on
    assert trainer.ema.updates == steps - 1

    _, final = latest_valid_checkpoint(tmp_path)
    best = load_checkpoint(tmp_path / "best.pt")
    trained = trainer.model_without_ddp.state_dict()
    assert tensor_hash(final["model"]) == tensor_hash(trainer.ema.weights) != tensor_hash(trained)
    assert tensor_hash(final["training_model"]) == tensor_hash(trained)  # evaluation gave the model its own back
    assert final["ema_updates"] == steps - 1 and best["ema_updates"] == steps - 1
    # validation and test measured the average, and the checkpoints record it as the model
    assert scripted_evaluation["weights"] == [tensor_hash(final["model"])] * 2
    assert final["test_metrics"] == best["test_metrics"] == {"AP": weights_ap(final["model"])}
    assert tensor_hash(best["model"]) == tensor_hash(final["model"])


def test_early_stopping_counts_validations_without_a_gain_of_min_delta(make, tmp_path, scripted_evaluation,
                                                                       capsys):
    # gains over the last improvement: 0.5 yes; 0.52 no (< 0.05, though best.pt takes it); 0.56 yes; 0.3 no; 0.3 no
    scripted_evaluation["script"] = [0.5, 0.52, 0.56, 0.3, 0.3, 0.9]
    overrides = ["train.epochs=6", "eval.every_epochs=1", "train.patience=2", "train.min_delta=0.05"]
    trainer = make(TinyDetector(), overrides)
    trainer.fit()
    assert trainer.progress.epoch == 5 and len(scripted_evaluation["val"]) == 5
    [stop] = events(tmp_path, "early_stop")
    assert (stop["epoch"], stop["step"], stop["best_ap"], stop["evals_since_improvement"]) == (
        5, trainer.progress.step, 0.56, 2)
    _, last = latest_valid_checkpoint(tmp_path)
    assert last["progress"]["epoch"] == 5 and last["progress"]["evals_since_improvement"] == 2
    per_epoch = {state["progress"]["epoch"]: state["progress"] for state in map(
        load_checkpoint, sorted(tmp_path.glob("checkpoint-*.pt")))}
    assert [per_epoch[epoch]["evals_since_improvement"] for epoch in range(1, 6)] == [0, 1, 0, 1, 2]
    assert per_epoch[2]["ap_at_last_improvement"] == 0.5 and per_epoch[2]["best_ap"] == 0.52
    assert load_checkpoint(tmp_path / "best.pt")["progress"]["epoch"] == 3

    # resumed, the run stays stopped: no step, no validation, no second event
    model = TinyDetector()
    resumed = make(model, overrides)
    resumed.progress = resume_run(resumed.cfg, resumed.strategy, model, resumed.optimizer, resumed.lr_schedule, None)
    resumed.fit()
    assert model.calls == [] and len(scripted_evaluation["val"]) == 5 and len(events(tmp_path, "early_stop")) == 1
    assert "early stopping ended this run at epoch 5" in capsys.readouterr().out
    # with more patience it trains on: the last epoch improves (0.9) and the run ends at train.epochs
    patient = make(TinyDetector(), [*overrides, "train.patience=3"])
    patient.progress = resume_run(patient.cfg, patient.strategy, patient.model_without_ddp, patient.optimizer,
                                  patient.lr_schedule, None)
    patient.fit()
    assert patient.progress.epoch == 6 and patient.progress.evals_since_improvement == 0
    assert len(events(tmp_path, "early_stop")) == 1
