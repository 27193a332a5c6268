"""Build a torchvision box detector for our class count and load local weights into it.

Models are always built with `weights=None, weights_backbone=None`: nothing is ever downloaded. Pretrained
weights come from a local file instead, either a torchvision COCO state dict or one of our checkpoints
(a dict whose "model" entry is the state dict). COCO files are made for 91 classes, so the tensors whose
shape depends on the class count (box predictor, classification logits) cannot be used for our K+1 classes:
they are skipped and reported. Everything else must match exactly, because a silently half-loaded backbone
trains to a worse model without any error.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from train.config import ModelConfig, model_config_from_dict
from train.freezing import freeze_batchnorm

log = logging.getLogger(__name__)

DETECTION_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn_resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": detection.fasterrcnn_mobilenet_v3_large_320_fpn,
    "retinanet_resnet50_fpn": detection.retinanet_resnet50_fpn,
    "retinanet_resnet50_fpn_v2": detection.retinanet_resnet50_fpn_v2,
    "fcos_resnet50_fpn": detection.fcos_resnet50_fpn,
    "ssd300_vgg16": detection.ssd300_vgg16,
    "ssdlite320_mobilenet_v3_large": detection.ssdlite320_mobilenet_v3_large,
}

DETECTOR_CLASSES: dict[str, type[nn.Module]] = {
    name: {"fasterrcnn": detection.FasterRCNN, "retinanet": detection.RetinaNet, "fcos": detection.FCOS,
           "ssd300": detection.ssd.SSD, "ssdlite320": detection.ssd.SSD}[name.split("_")[0]]
    for name in DETECTION_BUILDERS
}

# SSD models resize every image to a fixed square (300 or 320 px) and take no min_size/max_size.
FIXED_SIZE_MODELS = frozenset({"ssd300_vgg16", "ssdlite320_mobilenet_v3_large"})

# Where the class-count dependent tensors live: Faster R-CNN's box predictor, the classification heads of
# RetinaNet / FCOS / SSD. Only tensors under these prefixes may be skipped for a shape mismatch.
CLASS_DEPENDENT_PREFIXES = ("roi_heads.box_predictor.", "head.classification_head.")

# BatchNorm2d counts its updates in this buffer; FrozenBatchNorm2d has none. It is not a weight, so a file
# and a model may disagree about it (COCO files of FrozenBN models, our BN checkpoints) without harm.
BATCHNORM_COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class SkippedTensor:
    key: str
    file_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass
class WeightsReport:
    """What a file gave: tensors loaded, head tensors skipped for shape, head keys missing."""

    source: Path | None = None
    loaded: int = 0
    skipped: list[SkippedTensor] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.source is None:
            return "weights: none given, random initialisation"
        skipped = "; ".join(
            f"{s.key} file {list(s.file_shape)} vs model {list(s.model_shape)}" for s in self.skipped
        )
        return (
            f"weights {self.source}: loaded {self.loaded} tensors, "
            f"skipped {len(self.skipped)} class-count head tensors ({skipped or 'none'}), "
            f"missing {len(self.missing)} head tensors ({', '.join(self.missing) or 'none'})"
        )


def build_model(cfg: ModelConfig, num_classes: int) -> tuple[nn.Module, WeightsReport]:
    """Build detector `cfg.name` on the CPU with a head for `num_classes` (background included).

    With `cfg.frozen_batchnorm` the backbone's BatchNorm2d layers become FrozenBatchNorm2d, as torchvision does
    for pretrained backbones: batches of 2 images per GPU are too small for useful batch statistics.
    """
    name = cfg.name
    if name not in DETECTION_BUILDERS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(DETECTION_BUILDERS)}")
    size_kwargs = {} if name in FIXED_SIZE_MODELS else {"min_size": cfg.min_size, "max_size": cfg.max_size}
    if name in FIXED_SIZE_MODELS:
        log.info("model %s resizes images to its own fixed size; min_size/max_size do not apply", name)
    builder_kwargs = cfg.builder_kwargs.given()
    representation_size = builder_kwargs.pop("representation_size", None)
    _check_builder_kwargs(name, builder_kwargs)
    model = DETECTION_BUILDERS[name](
        weights=None, weights_backbone=None, num_classes=num_classes, **size_kwargs, **builder_kwargs
    )
    if representation_size is not None:
        resize_box_head(model, name, representation_size, num_classes)
    if cfg.frozen_batchnorm:
        frozen = freeze_batchnorm(model.backbone)
        log.info("model %s: %d BatchNorm2d layers of the backbone frozen", name, frozen)
    report = WeightsReport() if cfg.weights is None else load_weights(model, cfg.weights)
    if cfg.weights is not None and name == "fasterrcnn_resnet50_fpn" and cfg.frozen_batchnorm:
        # torchvision's COCO_V1 weights for this model were trained with BatchNorm eps 0 and its builder
        # restores that on load; without it the published 37.0 box AP is not reproduced exactly.
        overwrite_eps(model, 0.0)
    return model, report


def trained_model_config(state: Mapping, path: str | Path) -> ModelConfig:
    """How the model in checkpoint `state` (read from `path`) was built, without its starting weights: the
    checkpoint's own state dict replaces them. Options a checkpoint predates take today's defaults."""
    return dataclasses.replace(model_config_from_dict(state["config"]["model"], str(path)), weights=None)


def _check_builder_kwargs(name: str, builder_kwargs: Mapping[str, object]) -> None:
    """A keyword the model's class does not take is a config error, not a TypeError from deep inside."""
    accepted = inspect.signature(DETECTOR_CLASSES[name].__init__).parameters
    unknown = [key for key in builder_kwargs if key not in accepted]
    if unknown:
        raise ValueError(
            f"model.builder_kwargs.{unknown[0]} does not apply to {name} ({DETECTOR_CLASSES[name].__name__} "
            "does not take it); leave it null for this model"
        )


def resize_box_head(model: nn.Module, name: str, representation_size: int, num_classes: int) -> None:
    """Give Faster R-CNN's two-layer box head (and so its predictor) `representation_size` features.

    The head maps every sampled proposal's 256x7x7 pooled features through two fully connected layers; at
    torchvision's 1024 it is most of a small model's training step on the CPU (see docs/benchmarks.md).
    """
    box_head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if not isinstance(box_head, TwoMLPHead):
        raise ValueError(
            f"model.builder_kwargs.representation_size applies to Faster R-CNN models with a two-layer box head, "
            f"not to {name}"
        )
    model.roi_heads.box_head = TwoMLPHead(box_head.fc6.in_features, representation_size)
    model.roi_heads.box_predictor = FastRCNNPredictor(representation_size, num_classes)


def load_weights(model: nn.Module, path: str | Path) -> WeightsReport:
    """Load a torchvision COCO state dict or one of our checkpoints ({"model": state_dict, ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; weights are only read from local files, nothing is "
            "downloaded (put the torchvision .pth file there or set model.weights to null)"
        )
    content = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = content.get("model") if isinstance(content, Mapping) and "model" in content else content
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise ValueError(
            f"weights file {path} holds neither a state dict nor a checkpoint with a 'model' state dict"
        )
    return load_state_dict_fitting(model, state_dict, source=path)


def load_state_dict_fitting(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path
) -> WeightsReport:
    """Load state_dict strictly, except for class-count head tensors that do not fit (skipped, reported)."""
    expected = model.state_dict()
    report = WeightsReport(source=source)
    to_load: dict[str, torch.Tensor] = {}
    unexpected, missing, misshapen = [], [], []
    for key, tensor in state_dict.items():
        if key not in expected:
            if not key.endswith(BATCHNORM_COUNTER):
                unexpected.append(key)
        elif tensor.shape == expected[key].shape:
            to_load[key] = tensor
        elif key.startswith(CLASS_DEPENDENT_PREFIXES):
            report.skipped.append(SkippedTensor(key, tuple(tensor.shape), tuple(expected[key].shape)))
        else:
            misshapen.append(f"{key} file {list(tensor.shape)} vs model {list(expected[key].shape)}")
    for key in expected:
        if key not in state_dict and not key.endswith(BATCHNORM_COUNTER):
            (report.missing if key.startswith(CLASS_DEPENDENT_PREFIXES) else missing).append(key)
    findings = {"unexpected keys": unexpected, "missing keys": missing, "shape mismatches": misshapen}
    problems = [f"{len(keys)} {label} (first: {keys[0]})" for label, keys in findings.items() if keys]
    if problems:
        raise ValueError(
            f"weights file {source} does not fit model {type(model).__name__}: {'; '.join(problems)}. "
            "Was it saved from another architecture?"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    return report
