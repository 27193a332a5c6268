"""torchvision weights by name, through a seeded torch.hub cache (TORCH_HOME), never the network: loaded as
torchvision's builders set them up, with a clear error and no hang when the file cannot be had."""

import inspect
import os
import socket
import time
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from model_helpers import PREDICTOR_KEYS, SMALL, small_model
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
from train.config import ModelConfig, config_to_dict, load_config
from train.detectors import DETECTION_BUILDERS, NoTorchvisionWeights, detector_weights_enum
from train.model import build_model, trained_model_config
from train.weights import (
    PretrainedWeightsUnavailable,
    fetch_starting_weights,
    starting_weights,
)

REAL_DOWNLOAD = torch.hub.download_url_to_file  # before tests/conftest.py replaces it for every test


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


TORCHVISION_DETECTORS = sorted(
    name for name in DETECTION_BUILDERS if detector_weights_enum(name) is not NoTorchvisionWeights
)


@pytest.mark.parametrize("setting", [(name, "weights") for name in TORCHVISION_DETECTORS] + BACKBONE_SETTINGS,
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


def test_our_stride16_detector_takes_imagenet_backbone_weights_by_name_and_coco_weights_from_a_file_only(
    torch_home: Path,
) -> None:
    torch.manual_seed(3)
    path = seed_cache(torch_home, MobileNet_V3_Large_Weights.IMAGENET1K_V1, mobilenet_v3_large().state_dict())
    file = torch.load(path, weights_only=True)
    name = "fasterrcnn_mobilenet_v3_large_stride16_fpn"
    model, report = build_model(ModelConfig(name, weights_backbone="IMAGENET1K_V1", min_size=128, max_size=160), 6)
    body = model.backbone.body.state_dict()
    assert report.into == "backbone.body" and report.loaded == len(body)
    assert all(torch.equal(tensor, file[f"features.{key}"]) for key, tensor in body.items())
    # the same body as torchvision's MobileNet FPN builders, frozen as they freeze it
    reference = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights_backbone="IMAGENET1K_V1", num_classes=6)
    assert layout(model.backbone.body) == layout(reference.backbone.body)
    with pytest.raises(FileNotFoundError, match=f"weights name of {name} .torchvision has no weights for it"):
        build_model(ModelConfig(name, weights="DEFAULT"), 6)


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
