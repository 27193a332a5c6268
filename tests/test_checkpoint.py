import argparse
import random

import numpy as np
import pytest
import torch
from torch import nn

from train.checkpoint import (
    CheckpointError,
    best_checkpoint_path,
    capture_rng_state,
    latest_valid_checkpoint,
    list_step_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_path,
    tensor_hash,
)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))


def _train_steps(model, optimizer, scheduler, steps):
    for _ in range(steps):
        inputs = torch.randn(4, 8)  # drawn from the global RNG, like torchvision's samplers
        loss = (model(inputs) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _training_objects():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.5)
    return model, optimizer, scheduler


def _full_state(model, optimizer, scheduler, step):
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "rng": [capture_rng_state()],
        "config": {"model": {"name": "tiny", "weights": None}, "optim": {"milestones": [2, 4]}},
        "phase": ("heads", 1.5, True),
    }


def test_round_trip_loads_with_weights_only(tmp_path):
    model, optimizer, scheduler = _training_objects()
    _train_steps(model, optimizer, scheduler, 2)
    state = _full_state(model, optimizer, scheduler, step=2)
    path = step_checkpoint_path(tmp_path, 2)

    save_checkpoint(state, path)

    assert path.name == "checkpoint-00000002.pt"
    loaded = torch.load(path, weights_only=True)
    assert tensor_hash(loaded["model"]) == tensor_hash(model.state_dict())
    assert tensor_hash(loaded["optimizer"]) == tensor_hash(optimizer.state_dict())
    assert loaded["lr_scheduler"] == scheduler.state_dict()
    assert loaded["config"] == state["config"]
    assert loaded["phase"] == ("heads", 1.5, True)
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("bad_value", [np.zeros(3), argparse.Namespace(lr=0.1)])
def test_state_that_weights_only_rejects_is_not_published(tmp_path, bad_value):
    path = tmp_path / "checkpoint-00000005.pt"
    save_checkpoint({"step": 4}, path)

    with pytest.raises(CheckpointError, match="weights_only") as raised:
        save_checkpoint({"step": 5, "args": bad_value}, path)

    assert str(path) in str(raised.value)
    assert load_checkpoint(path)["step"] == 4  # the previous file is untouched
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_overwrite_replaces_content(tmp_path):
    path = best_checkpoint_path(tmp_path)
    save_checkpoint({"step": 1, "w": torch.zeros(3)}, path)
    save_checkpoint({"step": 2, "w": torch.ones(3)}, path)
    assert path.name == "best.pt"
    loaded = load_checkpoint(path)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.ones(3))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_load_reports_truncated_and_garbage_files(tmp_path):
    truncated = tmp_path / "checkpoint-00000001.pt"
    save_checkpoint({"w": torch.randn(100)}, truncated)
    _truncate(truncated)
    garbage = tmp_path / "checkpoint-00000002.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)

    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_latest_valid_checkpoint_skips_broken_ones_with_a_warning(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(
            {"step": step, "w": torch.full((50,), float(step))}, step_checkpoint_path(tmp_path, step)
        )
    save_checkpoint({"step": 0}, best_checkpoint_path(tmp_path))
    _truncate(step_checkpoint_path(tmp_path, 30))
    step_checkpoint_path(tmp_path, 40).write_bytes(b"\x00garbage")

    with pytest.warns(RuntimeWarning) as warned:
        found = latest_valid_checkpoint(tmp_path)

    assert found is not None
    path, state = found
    assert path == step_checkpoint_path(tmp_path, 20)
    assert state["step"] == 20 and torch.equal(state["w"], torch.full((50,), 20.0))
    messages = [str(w.message) for w in warned]
    assert any("checkpoint-00000040.pt" in m for m in messages)
    assert any("checkpoint-00000030.pt" in m for m in messages)


def test_latest_valid_checkpoint_none_without_checkpoints(tmp_path):
    assert latest_valid_checkpoint(tmp_path / "does-not-exist") is None
    save_checkpoint({"step": 3}, best_checkpoint_path(tmp_path))
    assert latest_valid_checkpoint(tmp_path) is None


def test_prune_keeps_newest_and_best(tmp_path):
    for step in (5, 100, 15, 1000, 50):
        save_checkpoint({"step": step}, step_checkpoint_path(tmp_path, step))
    save_checkpoint({"step": 15}, best_checkpoint_path(tmp_path))
    stale_temp = tmp_path / ".checkpoint-00002000.pt.abc123.tmp"
    stale_temp.write_bytes(b"partial")

    deleted = prune_checkpoints(tmp_path, keep_last=2)

    assert [step for step, _ in list_step_checkpoints(tmp_path)] == [100, 1000]
    assert best_checkpoint_path(tmp_path).is_file()
    assert not stale_temp.exists()
    assert sorted(p.name for p in deleted) == sorted(
        [
            ".checkpoint-00002000.pt.abc123.tmp",
            "checkpoint-00000005.pt",
            "checkpoint-00000015.pt",
            "checkpoint-00000050.pt",
        ]
    )
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, keep_last=0)


def _draw_all():
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.standard_normal(3).tolist(),
        np.random.randint(0, 1000, 3).tolist(),
        torch.randn(4).tolist(),
    )


def test_rng_state_restores_every_generator_through_a_checkpoint(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and in numpy's legacy state
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = _draw_all()

    _draw_all()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])

    assert _draw_all() == expected


def test_resume_from_checkpoint_is_bitwise_exact(tmp_path):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model, optimizer, scheduler = _training_objects()
    _train_steps(model, optimizer, scheduler, 6)
    uninterrupted = tensor_hash(model.state_dict())

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model, optimizer, scheduler = _training_objects()
    _train_steps(model, optimizer, scheduler, 3)
    save_checkpoint(_full_state(model, optimizer, scheduler, step=3), step_checkpoint_path(tmp_path, 3))
    torch.manual_seed(123)  # the restarted process starts from other RNG states

    path, state = latest_valid_checkpoint(tmp_path)
    model, optimizer, scheduler = _training_objects()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    restore_rng_state(state["rng"][0])
    _train_steps(model, optimizer, scheduler, 3)

    assert tensor_hash(model.state_dict()) == uninterrupted


def test_tensor_hash_sees_one_ulp_dtype_and_key_changes():
    weights = {"a": torch.randn(5), "b": torch.arange(4, dtype=torch.bfloat16), "c": torch.tensor(3)}
    reference = tensor_hash(weights)
    assert tensor_hash({k: v.clone() for k, v in weights.items()}) == reference

    nudged = dict(weights, a=weights["a"].clone())
    nudged["a"][2] = torch.nextafter(nudged["a"][2], torch.tensor(float("inf")))
    assert tensor_hash(nudged) != reference
    assert tensor_hash(dict(weights, c=torch.tensor(3.0))) != reference
    assert tensor_hash({"z": weights["a"], "b": weights["b"], "c": weights["c"]}) != reference
    with pytest.raises(TypeError, match="ndarray"):
        tensor_hash({"a": np.zeros(2)})
