"""build_model: every detector builds for our class count; weights from a local file load strictly but for the
class-count head; a checkpoint rebuilds as it was trained. Weights by name: tests/test_weights_by_name.py."""

from pathlib import Path

import pytest
import torch
from model_helpers import PREDICTOR_KEYS, SMALL, batchnorm_kinds, small_model
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from data_prep.class_list import ClassList
from train.checkpoint import load_model_checkpoint, save_checkpoint, tensor_hash
from train.config import BuilderKwargs, ModelConfig, config_to_dict, load_config
from train.detectors import DETECTION_BUILDERS
from train.model import build_model, model_from_checkpoint, trained_model_config
from train.weights import (
    CLASS_DEPENDENT_PREFIXES,
    load_state_dict_fitting,
)


def test_coco_style_state_dict_loads_everything_but_the_predictor(tmp_path: Path) -> None:
    # torchvision's COCO files are 91-class state dicts; ours were trained with BatchNorm (num_batches_tracked
    # entries) and are loaded into a FrozenBatchNorm model, which has none.
    coco = small_model(91, seed=0, frozen_batchnorm=False)
    path = tmp_path / "coco.pth"
    torch.save(coco.state_dict(), path)
    torch.manual_seed(1)
    model, report = build_model(ModelConfig(SMALL, weights=path, min_size=128, max_size=160), 6)

    source, loaded = coco.state_dict(), model.state_dict()
    for key, tensor in loaded.items():
        if key in PREDICTOR_KEYS:
            assert tensor.shape[0] != source[key].shape[0]
        else:
            assert torch.equal(tensor, source[key]), key
    assert {s.key for s in report.skipped} == PREDICTOR_KEYS
    cls_score = next(s for s in report.skipped if s.key == "roi_heads.box_predictor.cls_score.weight")
    assert cls_score.file_shape == (91, 1024) and cls_score.model_shape == (6, 1024)
    assert report.loaded == len(loaded) - len(PREDICTOR_KEYS)
    assert report.missing == []
    text = str(report)
    assert str(path) in text
    assert "roi_heads.box_predictor.cls_score.weight file [91, 1024] vs model [6, 1024]" in text


def test_our_checkpoint_format_loads_every_tensor(tmp_path: Path) -> None:
    trained = small_model(6, seed=0)
    path = tmp_path / "step_00000010.pt"
    torch.save({"model": trained.state_dict(), "epoch": 3, "step": 10, "world_size": 2}, path)
    model = small_model(6, seed=1, weights=path)

    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained.state_dict()[key]), key


def test_batchnorm_checkpoint_loads_without_its_counters_into_a_batchnorm_model(tmp_path: Path) -> None:
    frozen = small_model(6, seed=0, frozen_batchnorm=True)
    path = tmp_path / "frozen.pth"
    torch.save(frozen.state_dict(), path)
    torch.manual_seed(1)
    model, report = build_model(ModelConfig(SMALL, weights=path, min_size=128, max_size=160, frozen_batchnorm=False), 6)

    assert report.loaded == len(frozen.state_dict()) and not report.skipped
    first_bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    first_frozen = next(m for m in frozen.backbone.modules() if isinstance(m, FrozenBatchNorm2d))
    assert torch.equal(first_bn.running_var, first_frozen.running_var)


def test_other_architecture_fails_naming_a_key_and_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ssd, _ = build_model(ModelConfig("ssdlite320_mobilenet_v3_large"), 91)
    path = tmp_path / "ssdlite.pth"
    torch.save(ssd.state_dict(), path)
    foreign_keys = set(ssd.state_dict()) - set(small_model(6, seed=0).state_dict())

    with pytest.raises(ValueError, match="unexpected keys") as error:
        small_model(6, seed=0, weights=path)
    message = str(error.value)
    assert str(path) in message
    assert any(key in message for key in foreign_keys)


def test_shape_mismatch_outside_the_class_head_is_an_error(tmp_path: Path) -> None:
    state = small_model(6, seed=0).state_dict()
    key = "backbone.fpn.inner_blocks.0.0.weight"
    state[key] = torch.zeros(7, *state[key].shape[1:])
    path = tmp_path / "tampered.pth"
    torch.save(state, path)

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        small_model(6, seed=0, weights=path)


def test_missing_file_lists_the_weights_names(tmp_path: Path) -> None:
    path = tmp_path / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a weights name") as error:
        build_model(ModelConfig(SMALL, weights=str(path)), 6)
    assert str(path) in str(error.value)
    assert "DEFAULT, COCO_V1" in str(error.value)


def test_file_without_a_state_dict_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "config.pt"
    torch.save({"lr": 0.02, "epochs": 3}, path)
    with pytest.raises(ValueError, match="neither a state dict"):
        build_model(ModelConfig(SMALL, weights=path), 6)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="fasterrcnn_resnet50_fpn, ") as error:
        build_model(ModelConfig("fasterrcnn_resnet18"), 6)
    assert "ssdlite320_mobilenet_v3_large" in str(error.value)


def test_sizes_and_batchnorm_options_reach_the_model() -> None:
    frozen = small_model(6, seed=0)
    assert frozen.transform.min_size == (128,) and frozen.transform.max_size == 160
    assert frozen.roi_heads.box_predictor.cls_score.out_features == 6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.modules())
    trainable_bn = small_model(6, seed=0, frozen_batchnorm=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in trainable_bn.backbone.modules())


@pytest.mark.parametrize("name", sorted(DETECTION_BUILDERS))
def test_every_detector_skips_only_its_class_head_from_91_to_6_classes(name: str) -> None:
    # Keys and shapes are all this checks, so the models are built on the meta device (no weight init).
    with torch.device("meta"):
        coco, _ = build_model(ModelConfig(name, frozen_batchnorm=False), 91)
        model, _ = build_model(ModelConfig(name), 6)
    report = load_state_dict_fitting(model, coco.state_dict(), source=Path(f"{name}.pth"))

    assert report.skipped, "the class-count head should not fit"
    assert all(s.key.startswith(CLASS_DEPENDENT_PREFIXES) for s in report.skipped)
    assert all(s.file_shape != s.model_shape for s in report.skipped)
    assert report.loaded + len(report.skipped) == len(set(coco.state_dict()) & set(model.state_dict()))
    assert report.missing == []


def test_file_without_the_class_head_reports_it_missing(tmp_path: Path) -> None:
    state = {k: v for k, v in small_model(6, seed=0).state_dict().items() if k not in PREDICTOR_KEYS}
    path = tmp_path / "no_head.pth"
    torch.save(state, path)
    _, report = build_model(ModelConfig(SMALL, weights=path, min_size=128, max_size=160), 6)
    assert sorted(report.missing) == sorted(PREDICTOR_KEYS) and report.loaded == len(state)


def test_builder_kwargs_reach_the_detector_and_resize_the_box_head() -> None:
    cfg = load_config(None, ["model.name=" + SMALL, "model.builder_kwargs.box_batch_size_per_image=64",
                             "model.builder_kwargs.rpn_post_nms_top_n_train=300",
                             "model.builder_kwargs.representation_size=128"])
    model, _ = build_model(cfg.model, 6)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert model.rpn._post_nms_top_n["training"] == 300
    assert model.roi_heads.box_head.fc7.out_features == 128
    assert model.roi_heads.box_predictor.cls_score.weight.shape == (6, 128)
    # a checkpoint of that model rebuilds as it was trained, and its state dict loads strictly
    state = {"config": config_to_dict(cfg), "model": model.state_dict()}
    rebuilt, _ = build_model(trained_model_config(state, "run/checkpoint.pt"), 6)
    rebuilt.load_state_dict(state["model"])


@pytest.mark.parametrize("frozen_batchnorm", [True, False])
def test_a_checkpoint_rebuilds_as_trained_with_its_weights(tmp_path: Path, frozen_batchnorm: bool) -> None:
    cfg = load_config(None, ["model.name=" + SMALL, "model.min_size=96", "model.max_size=128",
                             f"model.frozen_batchnorm={str(frozen_batchnorm).lower()}"])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, 4)
    categories = [{"category_id": i, "label": i, "name": f"c{i}"} for i in (1, 2, 3)]
    path = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "categories": categories, "config": config_to_dict(cfg)}, path)

    rebuilt, rebuilt_cfg = model_from_checkpoint(load_model_checkpoint(path), path)

    assert rebuilt_cfg.frozen_batchnorm is frozen_batchnorm and rebuilt_cfg.weights is None
    assert batchnorm_kinds(rebuilt) == {FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d}
    assert tensor_hash(rebuilt.state_dict()) == tensor_hash(model.state_dict())


def test_a_checkpoint_whose_weights_do_not_fit_its_class_list_names_the_file(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=" + SMALL, "model.min_size=128", "model.max_size=160"])
    four_classes = small_model(5, seed=0)
    three_classes = ClassList.from_names({1: "bottle", 3: "box", 7: "shoe"}).to_json()
    state = {"model": four_classes.state_dict(), "categories": three_classes, "config": config_to_dict(cfg)}
    with pytest.raises(ValueError, match=rf"{tmp_path / 'best.pt'}: weights do not fit model {SMALL}"):
        model_from_checkpoint(state, tmp_path / "best.pt")



def test_builder_kwargs_the_model_does_not_take_are_a_config_error() -> None:
    cfg = ModelConfig("retinanet_resnet50_fpn", builder_kwargs=BuilderKwargs(box_batch_size_per_image=64))
    with pytest.raises(ValueError, match=r"model.builder_kwargs.box_batch_size_per_image does not apply to "
                                         r"retinanet_resnet50_fpn"):
        build_model(cfg, 6)
    cfg = ModelConfig("retinanet_resnet50_fpn", builder_kwargs=BuilderKwargs(representation_size=128))
    with pytest.raises(ValueError, match="representation_size applies to Faster R-CNN"):
        build_model(cfg, 6)


def test_anchor_sizes_replace_the_builders_and_survive_a_checkpoint() -> None:
    sizes = [[16, 24, 32, 48, 64], [64, 80, 96, 128, 192], [128, 160, 192, 256, 320]]
    cfg = load_config(None, ["model.name=" + SMALL, "model.min_size=128", "model.max_size=128",
                             f"model.builder_kwargs.anchor_sizes={sizes}"])
    model, _ = build_model(cfg.model, 6)
    state = {"config": config_to_dict(cfg), "model": model.state_dict()}
    rebuilt, _ = build_model(trained_model_config(state, "run/checkpoint.pt"), 6)
    rebuilt.load_state_dict(state["model"])
    for detector in (model, rebuilt):
        images, _ = detector.eval().transform([torch.rand(3, 128, 128)])
        features = list(detector.backbone(images.tensors).values())
        (anchors,) = detector.rpn.anchor_generator(images, features)
        sides = (anchors[:, 2:] - anchors[:, :2]).prod(1).sqrt()
        # the first map (stride 32: 4x4 locations of 15 anchors each) starts at 16 px; torchvision's at 32
        assert sides.min().round() == 16 and sides[: 4 * 4 * 15].max().round() == 64
        assert sides.max().round() == 320


def test_anchor_sizes_must_fit_the_builders_layout() -> None:
    cfg = load_config(None, ["model.name=" + SMALL, "model.builder_kwargs.anchor_sizes=[[16, 32]]"])
    with pytest.raises(ValueError, match=r"anchor_sizes: .* needs 3 lists \(one per feature map\) of \[5, 5, 5\]"):
        build_model(cfg.model, 6)
    cfg = ModelConfig("ssdlite320_mobilenet_v3_large", builder_kwargs=BuilderKwargs(anchor_sizes=[[16]]))
    with pytest.raises(ValueError, match="ssdlite320_mobilenet_v3_large has no AnchorGenerator"):
        build_model(cfg, 6)
    with pytest.raises(ValueError, match=r"model.builder_kwargs: anchor_sizes must be non-empty lists"):
        load_config(None, ["model.builder_kwargs.anchor_sizes=[[16], []]"])


def test_the_stride16_detector_sees_a_finer_grid_with_smaller_anchors_and_trains() -> None:
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig("fasterrcnn_mobilenet_v3_large_stride16_fpn", frozen_batchnorm=False,
                                       min_size=256, max_size=256), 6)
    images, _ = model.eval().transform([torch.rand(3, 256, 256)])
    features = model.backbone(images.tensors)
    assert [f.shape[-1] for f in features.values()] == [16, 8, 8, 4]  # strides 16, 32, 32, 64
    anchors = model.rpn.anchor_generator(images, list(features.values()))[0]
    assert (anchors[:, 2:] - anchors[:, :2]).prod(1).sqrt().min().round() == 16
    losses = model.train()([torch.rand(3, 256, 256)], [{"boxes": torch.tensor([[40.0, 50.0, 60.0, 68.0]]),
                                                          "labels": torch.tensor([2])}])
    sum(losses.values()).backward()
    assert all(torch.isfinite(loss) for loss in losses.values())
    assert model.backbone.fpn.inner_blocks[0][0].weight.grad.abs().sum() > 0  # the stride-16 level learns
