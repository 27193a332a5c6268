"""bf16 autocast on the CPU keeps depthwise convolutions in float32 (train/precision.py): the same model and state
dict, float32 where it matters, bf16 elsewhere, and a training run whose checkpoint is a plain detector."""

import copy

import pytest
import torch
from model_helpers import small_model
from torch import nn

from train.checkpoint import latest_valid_checkpoint, tensor_hash
from train.main import main as train_main
from train.model import model_from_checkpoint
from train.precision import Float32Conv2d, depthwise_convs_in_float32


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def test_depthwise_convs_become_float32_convs_with_the_same_weights():
    model = small_model(6, seed=0, frozen_batchnorm=False).eval()
    original = copy.deepcopy(model)
    parameters = {id(p) for p in model.parameters()}
    depthwise = sum(is_depthwise(m) for m in model.modules())

    assert depthwise_convs_in_float32(model) == depthwise > 0
    assert [type(m) for m in model.modules() if is_depthwise(m)] == [Float32Conv2d] * depthwise
    assert tensor_hash(model.state_dict()) == tensor_hash(original.state_dict())
    assert {id(p) for p in model.parameters()} == parameters  # an optimizer built before still holds them
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        converted, plain = model(images)[0], original(images)[0]
    assert all(torch.equal(converted[key], plain[key]) for key in plain)  # without autocast: the same computation


def test_under_bf16_autocast_only_depthwise_convs_compute_in_float32():
    model = small_model(6, seed=0, frozen_batchnorm=False)
    depthwise_convs_in_float32(model)
    output_dtypes = {Float32Conv2d: set(), nn.Conv2d: set()}
    for module in model.backbone.modules():
        if type(module) in output_dtypes:
            module.register_forward_hook(lambda m, _, out: output_dtypes[type(m)].add(out.dtype))
    target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([torch.rand(3, 128, 128)], [target])
    sum(losses.values()).backward()

    assert output_dtypes == {Float32Conv2d: {torch.float32}, nn.Conv2d: {torch.bfloat16}}
    gradients = [m.weight.grad for m in model.modules() if isinstance(m, Float32Conv2d)]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gradients)
    assert any(g.abs().sum() > 0 for g in gradients)


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # main's @record under pytest's capture
def test_cpu_bf16_training_converts_and_checkpoints_a_plain_detector(small_manifest, tmp_path, capsys):
    assert train_main([
        f"data.manifest={small_manifest}", f"run_dir={tmp_path}", "strategy=single", "wandb.mode=disabled",
        "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=96", "model.max_size=128",
        "model.frozen_batchnorm=false", "model.builder_kwargs.representation_size=32", "data.batch_size=2",
        "data.num_workers=0", "optim.lr=0.01", "optim.warmup_steps=2", "train.amp=bf16", "train.max_steps=2",
        "checkpoint.every_steps=2", "eval.every_epochs=0", "eval.test_at_end=false"]) == 0
    assert "depthwise convolutions compute in float32" in capsys.readouterr().out

    path, state = latest_valid_checkpoint(tmp_path)
    model, _ = model_from_checkpoint(state, path)  # loads strictly
    assert not any(isinstance(m, Float32Conv2d) for m in model.modules())
    assert any(is_depthwise(m) for m in model.modules())
