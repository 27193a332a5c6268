"""What the model and weights tests share: the small detector they build and the keys of its class head."""

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from train.config import ModelConfig
from train.model import build_model

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
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


def batchnorm_kinds(model: nn.Module) -> set[type]:
    return {type(m) for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)}

