"""train/freezing.py: prefix patterns, schedule validation, phase lookup, requires_grad, frozen BatchNorm."""

from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
from torchvision.ops import FrozenBatchNorm2d

from train.config import FreezePhase, ModelConfig, load_config
from train.freezing import apply_phase, freeze_batchnorm, matches, phase_at, validate_schedule
from train.model import build_model

CONFIG_FILES = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
NUM_CLASSES = 6


def small_detector() -> nn.Module:
    torch.manual_seed(0)
    return fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=64, max_size=64
    )


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("backbone.body.layer1.0.conv1.weight", "backbone.body.layer1", True),
        ("backbone.body.layer10.0.conv1.weight", "backbone.body.layer1", False),
        ("backbone.body.layer1", "backbone.body.layer1", True),
        ("backbone.body.layer1.0.conv1.weight", "backbone.body.layer1.0.conv1.weight", True),
        ("backbone.body.layer1.0.conv1.weight", "backbone.body.lay", False),
        ("backbone.body.10.block.0.0.weight", "backbone.body.1", False),
        ("rpn.head.conv.0.0.weight", "*", True),
        ("rpn.head.conv.0.0.weight", "roi_heads", False),
    ],
)
def test_patterns_are_prefixes_with_a_dot_boundary(name, pattern, expected):
    assert matches(name, pattern) is expected


def test_star_trains_everything_and_frozen_excludes():
    model = small_detector()
    every = {name for name, _ in model.named_parameters()}
    total = sum(parameter.numel() for parameter in model.parameters())

    assert apply_phase(model, FreezePhase(name="all", start_epoch=0, train=["*"])) == total
    assert trainable_names(model) == every

    no_body = FreezePhase(name="no_body", start_epoch=0, train=["*"], frozen=["backbone.body"])
    count = apply_phase(model, no_body)
    assert trainable_names(model) == {name for name in every if not name.startswith("backbone.body.")}
    assert count == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone.body."))

    apply_phase(model, FreezePhase(name="rpn", start_epoch=0, train=["rpn", "roi_heads.box_head"]))
    assert trainable_names(model) == {
        name for name in every if name.startswith(("rpn.", "roi_heads.box_head."))
    }

    assert apply_phase(model, None) == total  # no schedule: everything trains


def test_trainable_count_changes_between_phases():
    phases = [FreezePhase(name="all_but_stem", start_epoch=0, train=["*"], frozen=["backbone.body.0"]),
              FreezePhase(name="everything", start_epoch=1, train=["*"])]
    model = small_detector()
    validate_schedule(model, phases)
    first, second = (apply_phase(model, phase) for phase in phases)
    stem = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.body.0."))
    assert stem > 0 and first == second - stem
    assert second == sum(parameter.numel() for parameter in model.parameters())


def test_a_frozen_parameter_gets_no_gradient_in_a_real_step():
    model = small_detector()
    apply_phase(model, FreezePhase(name="heads", start_epoch=0, train=["rpn", "roi_heads"]))
    model.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
        {
            "boxes": torch.tensor([[10.0, 10.0, 60.0, 30.0], [1.0, 1.0, 20.0, 20.0]]),
            "labels": torch.tensor([1, 5]),
        },
    ]
    sum(model(images, targets).values()).backward()
    for name, parameter in model.named_parameters():
        if name.startswith(("rpn.", "roi_heads.")):
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name


def test_pattern_matching_nothing_names_phase_pattern_and_modules():
    model = small_detector()
    phases = [
        FreezePhase(name="heads", start_epoch=0, train=["rpn", "roi_heads"]),
        FreezePhase(name="deeper", start_epoch=2, train=["*"], frozen=["backbone.body.layr1"]),
    ]
    with pytest.raises(ValueError) as error:
        validate_schedule(model, phases)
    message = str(error.value)
    assert "freeze phase 1 ('deeper'): pattern 'backbone.body.layr1' matches no parameter" in message
    assert "top-level modules with parameters are: backbone, rpn, roi_heads" in message
    assert "did you mean" not in message  # MobileNet has no layer1; nothing is close enough to suggest


def test_a_misspelt_pattern_gets_a_suggestion():
    phase = FreezePhase(name="heads", start_epoch=0, train=["roi_head"])
    with pytest.raises(ValueError, match=r"pattern 'roi_head' matches .* \(did you mean 'roi_heads'\?\)"):
        validate_schedule(small_detector(), [phase])


def test_pattern_with_a_trailing_dot_matches_nothing():
    with pytest.raises(ValueError, match="pattern 'rpn.' matches no parameter"):
        validate_schedule(small_detector(), [FreezePhase(name="a", start_epoch=0, train=["rpn."])])


def test_phase_that_trains_nothing_is_an_error():
    phase = FreezePhase(name="nothing", start_epoch=0, train=["rpn"], frozen=["*"])
    with pytest.raises(ValueError, match=r"freeze phase 0 \('nothing'\) leaves no parameter to train"):
        validate_schedule(small_detector(), [phase])


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ([FreezePhase(name="late", start_epoch=1, train=["*"])], "must have start_epoch 0"),
        (
            [
                FreezePhase(name="a", start_step=0, train=["*"]),
                FreezePhase(name="b", start_epoch=3, train=["*"]),
            ],
            "not a mix",
        ),
        (
            [
                FreezePhase(name="a", start_step=0, train=["*"]),
                FreezePhase(name="b", start_step=90, train=["*"]),
                FreezePhase(name="c", start_step=40, train=["*"]),
            ],
            "'c' (40) follows 'b' (90)",
        ),
    ],
)
def test_validate_schedule_checks_the_order(phases, message):
    with pytest.raises(ValueError) as error:
        validate_schedule(small_detector(), phases)
    assert message in str(error.value)


def test_phase_at_for_epoch_started_phases():
    phases = [
        FreezePhase(name="heads", start_epoch=0, train=["rpn"]),
        FreezePhase(name="more", start_epoch=2, train=["*"]),
        FreezePhase(name="all", start_epoch=4, train=["*"]),
    ]
    picked = [phase_at(phases, epoch=epoch, step=1000 * epoch) for epoch in range(7)]
    assert picked == [0, 0, 1, 1, 2, 2, 2]


def test_phase_at_for_step_started_phases():
    phases = [
        FreezePhase(name="heads", start_step=0, train=["rpn"]),
        FreezePhase(name="all", start_step=100, train=["*"]),
    ]
    assert phase_at(phases, epoch=0, step=0) == 0
    assert phase_at(phases, epoch=5, step=99) == 0  # the epoch does not matter
    assert phase_at(phases, epoch=0, step=100) == 1
    assert phase_at(phases, epoch=0, step=10_000) == 1


def test_phase_at_without_phases_is_none():
    assert phase_at([], epoch=3, step=30) is None


def test_freeze_batchnorm_keeps_eval_outputs_and_leaves_no_batchnorm():
    model = small_detector()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # statistics far from the identity, so a lost copy would show
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-3  # as in torchvision's classification MobileNetV3: must be carried over
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
    batchnorms = sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    body = model.backbone.eval()
    images = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        before = body(images)

    assert freeze_batchnorm(model) == batchnorms > 0
    assert not any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    assert sum(isinstance(module, FrozenBatchNorm2d) for module in model.modules()) == batchnorms
    with torch.no_grad():
        after = body(images)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-5)


def test_frozen_batchnorm_statistics_do_not_move_in_training():
    model = small_detector()
    freeze_batchnorm(model)
    frozen = [module for module in model.modules() if isinstance(module, FrozenBatchNorm2d)]
    means = [module.running_mean.clone() for module in frozen]
    model.train()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([3])}]
    sum(model(images, targets).values()).backward()
    assert all(torch.equal(module.running_mean, mean) for module, mean in zip(frozen, means, strict=True))


@cache
def model_for(name: str, frozen_batchnorm: bool) -> nn.Module:
    model, _ = build_model(ModelConfig(name, frozen_batchnorm=frozen_batchnorm), NUM_CLASSES)
    return model


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_every_config_schedule_fits_the_model_it_names(path):
    cfg = load_config(path)
    model = model_for(cfg.model.name, cfg.model.frozen_batchnorm)
    validate_schedule(model, cfg.freeze.phases)
    counts = [apply_phase(model, phase) for phase in cfg.freeze.phases]
    assert all(count > 0 for count in counts)
    assert counts == sorted(counts)  # our schedules only ever unfreeze more
