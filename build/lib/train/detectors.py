"""The detectors we build by name: torchvision's builder and detector class for each, and what sets them apart.

One table that model building (train/model.py) and starting weights (train/weights.py) both read.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import detection

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

# Models whose backbone is a classification network cut after its last feature layer (`backbone.body`) under an
# FPN; model.weights_backbone loads ImageNet weights into it. (SSD backbones are re-arranged VGG/MobileNet layers,
# and SSDlite's changes shape with a pretrained backbone: not supported there.)
BODY_BACKBONE_MODELS = frozenset(DETECTION_BUILDERS) - FIXED_SIZE_MODELS
