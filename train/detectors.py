"""The detectors we build by name: torchvision's builder and detector class for each, and what sets them apart.

One table that model building (train/model.py) and starting weights (train/weights.py) both read.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, WeightsEnum, detection, get_model_weights
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone


class NoTorchvisionWeights(WeightsEnum):
    """The `weights` of our own detectors: torchvision has no file for them (a local file still works)."""


def fasterrcnn_mobilenet_v3_large_stride16_fpn(
    *, weights: NoTorchvisionWeights | None = None, weights_backbone: MobileNet_V3_Large_Weights | None = None,
    num_classes: int = 91, **kwargs,
) -> detection.FasterRCNN:
    """torchvision's fasterrcnn_mobilenet_v3_large_320_fpn with the stride-16 stage added to its FPN.

    Torchvision's MobileNet FPN takes the backbone's last two stages, both at stride 32, so a 256-px image is
    an 8x8 grid with anchors from 32 px: objects under 32 px barely get an anchor. Adding the stride-16 stage
    (16x16) with anchors from 16 px on it costs ~9% of a CPU training step and trains the synthetic set's
    products ~1.7x faster in validation AP50 (docs/benchmarks.md, "Feature strides and anchors"). Built from
    torchvision's own parts, with its 320 model's test-time proposal settings; `weights` takes a local file only,
    `weights_backbone` torchvision's ImageNet MobileNetV3-Large weights.
    """
    if weights is not None or weights_backbone is not None:
        raise ValueError("build it without weights; train/model.py loads them (train/weights.py)")
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=6,
                                  norm_layer=nn.BatchNorm2d, returned_layers=[3, 4, 5])
    # maps at strides 16, 32, 32 (the last two stages) and 64 (max pool): anchor sizes grow with them
    sizes = ((16, 24, 32, 48, 64), (32, 48, 64, 96, 128), (64, 96, 128, 160, 192), (128, 160, 192, 256, 320))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    options = {"min_size": 320, "max_size": 320, "rpn_score_thresh": 0.05, "rpn_pre_nms_top_n_test": 150,
               "rpn_post_nms_top_n_test": 150} | kwargs
    return detection.FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **options)


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
    "fasterrcnn_mobilenet_v3_large_stride16_fpn": fasterrcnn_mobilenet_v3_large_stride16_fpn,  # ours
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


def detector_weights_enum(name: str) -> type[WeightsEnum]:
    """The weights enum of detector `name`'s `weights` parameter: torchvision's, or an empty one for ours."""
    builder = DETECTION_BUILDERS[name]
    return NoTorchvisionWeights if builder.__module__ == __name__ else get_model_weights(builder)
