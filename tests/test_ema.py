"""The weights' moving average (train/ema.py) on a tiny module, against values worked out by hand; the EMA in
training runs is tested in tests/test_loop.py (in process) and tests/test_train.py (torchrun, resume)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train.ema import ModelEma


def tiny_module() -> nn.Module:
    """A float64 linear layer (one weight moved by hand, a frozen bias) and a BatchNorm with an integer buffer."""
    model = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)).double()
    with torch.no_grad():
        model[0].weight.fill_(0.0)
        model[0].bias.fill_(0.1)
    model[0].bias.requires_grad_(False)
    return model


def test_the_average_follows_the_warmed_up_decay_in_fp32():
    model = tiny_module()
    ema = ModelEma(model, decay=0.9, tau=2.0)
    assert all(ema.weights[name].dtype == torch.float32 for name in ("0.weight", "0.bias", "1.running_mean"))
    assert ema.weights["1.num_batches_tracked"].dtype == torch.int64
    # decay of update u: 0.9 * (1 - exp(-u / 2)) = 0.354122, 0.568909, 0.699183; average += (1 - decay) * (w - average)
    expected = [0.6458776, 1.2296282, 2.0630036]
    for update, (weight, average) in enumerate(zip([1.0, 2.0, 4.0], expected, strict=True), start=1):
        with torch.no_grad():
            model[0].weight.fill_(weight)
        model[1].num_batches_tracked.fill_(10 * update)
        ema.update(model)
        assert ema.updates == update
        assert ema.weights["0.weight"].item() == pytest.approx(average, abs=1e-6)
        assert ema.weights["1.num_batches_tracked"].item() == 10 * update  # copied, not averaged
    # an unchanging tensor (a frozen parameter) stays bitwise what it was: 0.1 in fp32
    assert torch.equal(ema.weights["0.bias"], torch.tensor([0.1], dtype=torch.float32))
    assert model[0].weight.item() == 4.0 and model[0].weight.dtype == torch.float64  # the model is untouched


def test_tau_zero_means_a_constant_decay_and_load_restores_bitwise():
    model = tiny_module()
    ema = ModelEma(model, decay=0.75, tau=0.0)
    assert ema.decay_at(1) == ema.decay_at(1000) == 0.75
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update(model)
    assert ema.weights["0.weight"].item() == 0.25  # 0.75 * 0 + 0.25 * 1, exact in binary
    restored = ModelEma(tiny_module(), decay=0.75, tau=0.0)
    restored.load({name: value.clone() for name, value in ema.weights.items()}, ema.updates)
    assert restored.updates == 1
    assert all(torch.equal(restored.weights[name], value) for name, value in ema.weights.items())
    with pytest.raises(ValueError, match="do not fit"):
        restored.load({"0.weight": ema.weights["0.weight"]}, 1)
    restored.restart_from(model)
    assert restored.updates == 0 and restored.weights["0.weight"].item() == 1.0
