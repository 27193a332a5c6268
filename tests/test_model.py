"""build_model: every detector builds for our class count; weights (a local file, or torchvision's by name through
a seeded torch.hub cache, never the network) load strictly but for the class-count head."""

import inspect
import os
import socket
import time
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet50_Weights,
    WeightsEnum,
    detection,
    get_model_weights,
    mobilenet_v3_large,
    resnet50,
)
from torchvision.ops import FrozenBatchNorm2d

import train.weights as weights_module
from train.checkpoint import load_model_checkpoint, save_checkpoint, tensor_hash
from train.config import BuilderKwargs, ModelConfig, config_to_dict, load_config
from train.detectors import DETECTION_BUILDERS
from train.model import build_model, model_from_checkpoint, trained_model_config
from train.weights import (
    CLASS_DEPENDENT_PREFIXES,
    PretrainedWeightsUnavailable,
    fetch_starting_weights,
    load_state_dict_fitting,
    starting_weights,
)

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
REAL_DOWNLOAD = torch.hub.download_url_to_file  # before tests/conftest.py replaces it for every test
PREDICTOR_KEYS = {
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
}


def small_model(num_classes: int, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model, _ = build_model(ModelConfig(SMALL, min_size=128, max_size=160, **kwargs), num_classes)
    return model


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
    state = {"model": four_classes.state_dict(), "categories": [{}, {}, {}], "config": config_to_dict(cfg)}
    with pytest.raises(ValueError, match=rf"{tmp_path / 'best.pt'}: weights do not fit model {SMALL}"):
        model_from_checkpoint(state, tmp_path / "best.pt")


def batchnorm_kinds(model: nn.Module) -> set[type]:
    return {type(m) for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)}


def test_builder_kwargs_the_model_does_not_take_are_a_config_error() -> None:
    cfg = ModelConfig("retinanet_resnet50_fpn", builder_kwargs=BuilderKwargs(box_batch_size_per_image=64))
    with pytest.raises(ValueError, match=r"model.builder_kwargs.box_batch_size_per_image does not apply to "
                                         r"retinanet_resnet50_fpn"):
        build_model(cfg, 6)
    cfg = ModelConfig("retinanet_resnet50_fpn", builder_kwargs=BuilderKwargs(representation_size=128))
    with pytest.raises(ValueError, match="representation_size applies to Faster R-CNN"):
        build_model(cfg, 6)


# ---- torchvision weights by name, through torch.hub's cache (TORCH_HOME) ---------------------------------------
@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache: tests put torchvision's files there under their real names."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def seed_cache(torch_home: Path, weights: WeightsEnum, state_dict: dict[str, torch.Tensor]) -> Path:
    """Save state_dict where torch.hub keeps the file of `weights`, as torchvision's files are: no BatchNorm
    counters, and running statistics far from a fresh model's (mean 0, variance 1), so that a BatchNorm layer
    that was not loaded shows."""
    generator = torch.Generator().manual_seed(7)
    seeded = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith(("running_var", "running_mean")) and tensor.device.type != "meta":
            tensor = torch.rand(tensor.shape, generator=generator) * 0.01 + 1e-4
        seeded[key] = tensor
    path = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(seeded, path)
    return path


def layout(model: nn.Module) -> dict[str, tuple]:
    """Every module's type and eps and every parameter's requires_grad: what torchvision's builder sets up."""
    modules = {name: (type(module).__name__, getattr(module, "eps", None)) for name, module in model.named_modules()}
    return {**modules, **{name: p.requires_grad for name, p in model.named_parameters()}}


@pytest.mark.parametrize("value", ["DEFAULT", "COCO_V1", "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"])
def test_coco_weights_by_name_load_from_the_cache_as_torchvision_sets_them_up(torch_home: Path, value: str) -> None:
    weights = get_model_weights(SMALL).COCO_V1
    torch.manual_seed(3)
    coco_model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    path = seed_cache(torch_home, weights, coco_model.state_dict())
    file = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    model, report = build_model(ModelConfig(SMALL, weights=value, min_size=128, max_size=160), 6)

    loaded = model.state_dict()
    for key, tensor in file.items():
        if key in PREDICTOR_KEYS:
            assert loaded[key].shape[0] != tensor.shape[0]
        else:
            assert torch.equal(loaded[key], tensor), key
    assert {s.key for s in report.skipped} == PREDICTOR_KEYS and report.loaded == len(file) - len(PREDICTOR_KEYS)
    text = str(report)
    assert "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1" in text and str(path) in text
    assert "roi_heads.box_predictor.cls_score.weight file [91, 1024] vs model [6, 1024]" in text
    # torchvision's own builder, reading the same cached file, is the reference for everything but the loading:
    # FrozenBatchNorm2d with its eps (1e-5, not MobileNetV3's 1e-3) and the backbone layers it freezes
    reference = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=value)
    assert layout(model) == layout(reference)
    assert {type(m) for m in model.backbone.body.modules()} >= {FrozenBatchNorm2d}
    assert not model.backbone.body["0"][0].weight.requires_grad and model.backbone.body["16"][0].weight.requires_grad


# For pretrained weights torchvision's builders use FrozenBatchNorm2d, except for these: our frozen_batchnorm
# (default true: 2 images per GPU give poor batch statistics) is the switch to match them.
TORCHVISION_KEEPS_BATCHNORM = {
    "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2", "ssdlite320_mobilenet_v3_large",
}
BACKBONE_SETTINGS = [("fasterrcnn_resnet50_fpn", "weights_backbone"), ("fcos_resnet50_fpn", "weights_backbone"),
                     ("fasterrcnn_mobilenet_v3_large_fpn", "weights_backbone")]


@pytest.mark.parametrize("setting", [(name, "weights") for name in sorted(DETECTION_BUILDERS)] + BACKBONE_SETTINGS,
                         ids="-".join)
def test_every_model_by_name_is_set_up_as_torchvisions_builder_does(torch_home: Path, setting) -> None:
    # On the meta device (shapes only): the cached files hold data-free tensors, and the builds are instant.
    name, key = setting
    builder = DETECTION_BUILDERS[name]
    with torch.device("meta"):
        if key == "weights":
            weights = get_model_weights(builder).DEFAULT
            seed_cache(torch_home, weights, builder(weights=None, weights_backbone=None).state_dict())
        else:
            weights = inspect.signature(builder).parameters["weights_backbone"].default  # IMAGENET1K_V1
            classifier = resnet50 if "resnet50" in name else mobilenet_v3_large
            seed_cache(torch_home, weights, classifier().state_dict())
        cfg = ModelConfig(name, frozen_batchnorm=name not in TORCHVISION_KEEPS_BATCHNORM, **{key: weights.name})
        model, report = build_model(cfg, 91)
        reference = builder(**{key: weights})
    assert report.loaded > 0
    assert layout(model) == layout(reference)


@pytest.mark.parametrize("local", [False, True], ids=["by_name", "local_file"])
def test_imagenet_backbone_fills_the_backbone_body(torch_home: Path, tmp_path: Path, local: bool) -> None:
    weights = MobileNet_V3_Large_Weights.IMAGENET1K_V1
    torch.manual_seed(3)
    path = seed_cache(torch_home, weights, mobilenet_v3_large(weights=None).state_dict())
    if local:
        path = path.rename(tmp_path / "my_mobilenet.pth")
    file = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    cfg = ModelConfig(SMALL, weights_backbone=str(path) if local else "IMAGENET1K_V1", min_size=128, max_size=160)
    model, report = build_model(cfg, 6)

    body = model.backbone.body.state_dict()
    assert body and all(torch.equal(tensor, file[f"features.{key}"]) for key, tensor in body.items()), "body not loaded"
    assert report.loaded == len(body) and report.into == "backbone.body"
    assert sorted(report.unused) == sorted(key for key in file if key.startswith("classifier."))
    assert "backbone weights" in str(report) and str(path) in str(report)
    if local:  # a file gives its tensors; what trains is the freezing schedule's choice
        assert all(p.requires_grad for p in model.parameters())
    else:  # a name: as torchvision's builder, which reads the same cached file
        reference = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights_backbone="IMAGENET1K_V1", num_classes=6)
        assert layout(model) == layout(reference)
        reference_body = reference.backbone.body.state_dict()
        assert all(torch.equal(tensor, reference_body[key]) for key, tensor in body.items())


def test_a_detector_file_as_backbone_weights_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "detector.pth"
    torch.save(small_model(6, seed=0).state_dict(), path)
    with pytest.raises(ValueError, match="lacks .* tensors of the backbone body") as error:
        build_model(ModelConfig(SMALL, weights_backbone=str(path)), 6)
    assert str(path) in str(error.value)


def test_without_network_the_error_says_where_to_put_the_file(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts = []

    def unreachable(url, *args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        build_model(ModelConfig(SMALL, weights="DEFAULT"), 6)

    url = get_model_weights(SMALL).DEFAULT.url
    file_name = "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert file_name in message and url in message
    assert f"put it at: {torch_home / 'hub' / 'checkpoints' / file_name}\n" in message
    assert "Temporary failure in name resolution" in message
    assert "or set model.weights to a local file path" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no urllib traceback attached
    assert timeouts == [weights_module.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() is None
    assert not (torch_home / "hub" / "checkpoints" / file_name).exists()


def test_a_silent_server_times_out_instead_of_hanging(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.hub's real downloader, pointed at a local server that accepts the connection and never answers
    with socket.create_server(("127.0.0.1", 0)) as server:
        local_url = f"http://127.0.0.1:{server.getsockname()[1]}/fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
        monkeypatch.setattr(torch.hub, "download_url_to_file",
                            lambda url, *args, **kwargs: REAL_DOWNLOAD(local_url, *args, **kwargs))
        monkeypatch.setattr(weights_module, "DOWNLOAD_TIMEOUT_S", 0.5)
        started = time.monotonic()
        with pytest.raises(PretrainedWeightsUnavailable, match="timed out"):
            fetch_starting_weights(ModelConfig(SMALL, weights="COCO_V1"))
    assert time.monotonic() - started < 10


def test_weights_values_that_cannot_work_are_errors_before_any_build() -> None:
    with pytest.raises(FileNotFoundError, match="'COCO_V2' is neither an existing file nor a weights name of") as error:
        starting_weights(ModelConfig(SMALL, weights="COCO_V2"))
    assert "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1" in str(error.value)
    with pytest.raises(ValueError, match="FasterRCNN_ResNet50_FPN_Weights.COCO_V1 are not weights of this model"):
        starting_weights(ModelConfig(SMALL, weights="FasterRCNN_ResNet50_FPN_Weights.COCO_V1"))
    with pytest.raises(ValueError, match="IMAGENET1K_V3 are not weights"):
        starting_weights(ModelConfig("fcos_resnet50_fpn", weights_backbone="ResNet50_Weights.IMAGENET1K_V3"))
    with pytest.raises(ValueError, match="both set"):
        starting_weights(ModelConfig(SMALL, weights="DEFAULT", weights_backbone="DEFAULT"))
    with pytest.raises(ValueError, match="weights_backbone applies to Faster R-CNN, RetinaNet and FCOS"):
        starting_weights(ModelConfig("ssdlite320_mobilenet_v3_large", weights_backbone="DEFAULT"))
    backbone = starting_weights(ModelConfig("fcos_resnet50_fpn", weights_backbone="DEFAULT"))
    assert backbone.named == ResNet50_Weights.IMAGENET1K_V2 and backbone.path.name == "resnet50-11ad3fa6.pth"


def test_a_checkpoint_started_from_a_name_rebuilds_with_its_eps_and_no_file(torch_home: Path) -> None:
    # torchvision loads this COCO file with FrozenBatchNorm2d eps 0; the eps is no tensor, so the checkpoint's
    # state dict does not carry it: its config must. (Shapes only, on the meta device.)
    cfg = load_config(None, ["model.name=fasterrcnn_resnet50_fpn", "model.weights=DEFAULT"])
    rebuilt_cfg = trained_model_config({"config": config_to_dict(cfg)}, "run/checkpoint.pt")
    assert rebuilt_cfg.weights is None and rebuilt_cfg.frozen_batchnorm_eps == 0.0
    with torch.device("meta"):
        rebuilt, report = build_model(rebuilt_cfg, 6)
        scratch, _ = build_model(ModelConfig("fasterrcnn_resnet50_fpn"), 6)
    assert report.source is None and not list(torch_home.glob("**/*.pth"))
    assert {m.eps for m in rebuilt.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    assert {m.eps for m in scratch.modules() if isinstance(m, FrozenBatchNorm2d)} == {1e-5}
    # the other COCO files keep their layers' own eps
    small = load_config(None, ["model.name=" + SMALL, "model.weights=DEFAULT"])
    assert trained_model_config({"config": config_to_dict(small)}, "c").frozen_batchnorm_eps is None


def test_the_configs_name_the_files_their_comments_say(torch_home: Path) -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    coco2000 = starting_weights(load_config(configs / "coco2000.yaml").model)
    coco_1x = starting_weights(load_config(configs / "coco_1x.yaml").model)
    assert coco2000.path == torch_home / "hub" / "checkpoints" / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert coco_1x.path == torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert coco_1x.key == "model.weights_backbone"
