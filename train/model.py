"""Build a torchvision box detector for our class count and load its starting weights into it.

The detector is always built by its torchvision builder *without* weights, so that it depends on the config
alone and a checkpoint rebuilds exactly; then its starting weights are loaded (train/weights.py). The builder's
own keyword arguments come from `model.builder_kwargs`; the cap on detections per image from `eval.max_detections`,
so that the model returns as many detections as COCOeval counts (train/evaluate.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from train.checkpoint import checkpoint_classes
from train.config import EvalConfig, ModelConfig, model_config_from_dict
from train.detectors import DETECTION_BUILDERS, DETECTOR_CLASSES, FIXED_SIZE_MODELS
from train.freezing import freeze_batchnorm
from train.weights import (
    WeightsReport,
    fetch_starting_weights,
    freeze_backbone_layers_as_torchvision,
    frozen_batchnorm_eps,
    load_starting_weights,
)

log = logging.getLogger(__name__)

LEGACY_CAP_KEY = "box_detections_per_img"  # model.builder_kwargs' name for the cap before eval.max_detections


def build_model(
    cfg: ModelConfig, num_classes: int, *, max_detections: int | None = None, resize_in_training: bool = True
) -> tuple[nn.Module, WeightsReport]:
    """Build detector `cfg.name` on the CPU with a head for `num_classes` (background included) and load its
    starting weights (`cfg.weights` or `cfg.weights_backbone`). With `max_detections` (eval.max_detections) it
    returns at most that many detections per image; None keeps the builder's own cap (torchvision: 100 for Faster
    R-CNN and FCOS, 300 for RetinaNet, 200 for SSD).

    resize_in_training=False: the reader has sized the training images (data.augment multiscale or lsj, see
    train/augment.py), so the model resizes to min_size/max_size in evaluation only (torchvision's `_skip_resize`).

    With `cfg.frozen_batchnorm` the backbone's BatchNorm2d layers become FrozenBatchNorm2d, as torchvision does
    for pretrained backbones: batches of 2 images per GPU are too small for useful batch statistics.

    Torchvision weights by name start as torchvision's builder would set them up, so that fine-tuning starts
    from the model torchvision measured: FrozenBatchNorm2d with the eps it used (`frozen_batchnorm_eps`), and the
    backbone layers its builder freezes by default (all but its default trainable_backbone_layers) get
    requires_grad False; a freezing schedule (freeze.phases) replaces that choice. (For the _v2 models and SSDlite
    torchvision keeps BatchNorm2d; model.frozen_batchnorm: false matches that.) The builder itself cannot do
    this here: with weights it insists on 91 classes, and a rebuild from a checkpoint must not need the file.
    A local file gives its tensors only: what trains is the schedule's choice (everything, without one).
    A name's file is downloaded into torch.hub's cache if it is not there yet (see `fetch_starting_weights`).
    """
    name = cfg.name
    start = fetch_starting_weights(cfg)  # before the build: a missing file fails before any work
    size_kwargs = {} if name in FIXED_SIZE_MODELS else {"min_size": cfg.min_size, "max_size": cfg.max_size}
    if not resize_in_training:
        size_kwargs["_skip_resize"] = True
    if name in FIXED_SIZE_MODELS:
        log.info("model %s resizes images to its own fixed size; min_size/max_size do not apply", name)
    builder_kwargs = cfg.builder_kwargs.given()
    representation_size = builder_kwargs.pop("representation_size", None)
    anchor_sizes = builder_kwargs.pop("anchor_sizes", None)
    _check_builder_kwargs(name, builder_kwargs)
    model = DETECTION_BUILDERS[name](
        weights=None, weights_backbone=None, num_classes=num_classes, **size_kwargs, **builder_kwargs
    )
    if representation_size is not None:
        resize_box_head(model, name, representation_size, num_classes)
    if anchor_sizes is not None:
        set_anchor_sizes(model, name, anchor_sizes)
    if max_detections is not None:
        set_max_detections(model, max_detections)
    if cfg.frozen_batchnorm:
        frozen = freeze_batchnorm(model.backbone, frozen_batchnorm_eps(cfg))
        log.info("model %s: %d BatchNorm2d layers of the backbone frozen", name, frozen)
    if start is None:
        return model, WeightsReport()
    report = load_starting_weights(model, start)
    if start.named is not None:
        frozen_parameters = freeze_backbone_layers_as_torchvision(model, cfg)
        log.info("model %s: %d backbone parameters frozen as torchvision's builder does", name, frozen_parameters)
    return model, report


def trained_model_config(state: Mapping, path: str | Path) -> ModelConfig:
    """How the model in checkpoint `state` (read from `path`) was built, without its starting weights: the
    checkpoint's own state dict replaces them. Their FrozenBatchNorm2d eps stays (it is no tensor, so the state
    dict does not hold it). Options a checkpoint predates take today's defaults."""
    saved_model = dict(state["config"]["model"])
    # Before eval.max_detections, the cap was a builder argument: trained_max_detections reads it from there.
    saved_model["builder_kwargs"] = {key: value for key, value in saved_model.get("builder_kwargs", {}).items()
                                     if key != LEGACY_CAP_KEY}
    saved = model_config_from_dict(saved_model, str(path))
    return dataclasses.replace(
        saved, weights=None, weights_backbone=None, frozen_batchnorm_eps=frozen_batchnorm_eps(saved)
    )


def trained_max_detections(state: Mapping) -> int:
    """The cap on detections per image the checkpoint's model was trained and evaluated with: its
    eval.max_detections; for a checkpoint from before that option, the builder argument it had then, else
    today's default."""
    config = state["config"]
    saved = config.get("eval", {}).get("max_detections")
    if saved is None:
        saved = config["model"].get("builder_kwargs", {}).get(LEGACY_CAP_KEY)
    return EvalConfig.max_detections if saved is None else int(saved)


def model_from_checkpoint(state: Mapping, path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """The trained model in checkpoint `state` (read from `path`; see train/checkpoint.py: load_model_checkpoint),
    on the CPU: built as it was trained (`trained_model_config`: name, sizes, BatchNorm kind and eps, builder
    arguments; `trained_max_detections`) with a head for its class list, and its weights loaded strictly."""
    model_cfg = trained_model_config(state, path)
    model, _ = build_model(model_cfg, checkpoint_classes(state, path).num_classes,
                           max_detections=trained_max_detections(state))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit model {model_cfg.name}: {error}") from error
    return model, model_cfg


# ---- the model's options ---------------------------------------------------------------------------------------------
def set_max_detections(model: nn.Module, max_detections: int) -> None:
    """At most `max_detections` detections per image: Faster R-CNN keeps its cap on roi_heads (the builder's
    box_detections_per_img), RetinaNet, FCOS and SSD on the model (detections_per_img)."""
    getattr(model, "roi_heads", model).detections_per_img = max_detections


def _check_builder_kwargs(name: str, builder_kwargs: Mapping[str, object]) -> None:
    """A keyword the model's class does not take is a config error, not a TypeError from deep inside."""
    accepted = inspect.signature(DETECTOR_CLASSES[name].__init__).parameters
    unknown = [key for key in builder_kwargs if key not in accepted]
    if unknown:
        raise ValueError(
            f"model.builder_kwargs.{unknown[0]} does not apply to {name} ({DETECTOR_CLASSES[name].__name__} "
            "does not take it); leave it null for this model"
        )


def set_anchor_sizes(model: nn.Module, name: str, anchor_sizes: Sequence[Sequence[int]]) -> None:
    """Give the model's anchor generator `anchor_sizes` (one list per feature map), keeping its aspect ratios.

    Torchvision's MobileNet Faster R-CNNs put anchors of 32-512 px on every one of their three maps (strides
    32, 32 and 64), which fits objects under 32 px badly (docs/benchmarks.md, "Feature strides and anchors").
    The number of anchors per location must stay the builder's, so that the head that scores them (and its
    pretrained weights) fit.
    """
    owner = getattr(model, "rpn", model)
    generator = getattr(owner, "anchor_generator", None)
    if not isinstance(generator, AnchorGenerator):
        raise ValueError(f"model.builder_kwargs.anchor_sizes: {name} has no AnchorGenerator to set them on")
    builder_sizes = [list(sizes) for sizes in generator.sizes]
    if len(anchor_sizes) != len(builder_sizes) or any(
        len(ours) != len(theirs) for ours, theirs in zip(anchor_sizes, builder_sizes, strict=False)
    ):
        raise ValueError(
            f"model.builder_kwargs.anchor_sizes: {name} needs {len(builder_sizes)} lists (one per feature map) of "
            f"{[len(sizes) for sizes in builder_sizes]} sizes, as its builder's {builder_sizes}; got {anchor_sizes}"
        )
    owner.anchor_generator = AnchorGenerator(tuple(tuple(sizes) for sizes in anchor_sizes),
                                             tuple(tuple(ratios) for ratios in generator.aspect_ratios))


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
