"""Scale augmentation of training samples, in the reader: the `data.augment` policies beyond the flip.

- `hflip` (the default): the flip alone (train/shard_reader.py); the model's transform then resizes each image to
  model.min_size / model.max_size, in training as in evaluation.
- `multiscale`: the shorter side is drawn from `data.scales`, the longer one capped at `data.max_size`
  (torchvision's RandomShortestSize, Detectron2's ResizeShortestEdge with sample_style "choice").
- `lsj`, large-scale jitter: the image is scaled to fit a `data.crop_size` square, times a factor drawn uniformly
  from `data.jitter_range`, then a random crop_size square is cut out of it or it is padded at the bottom and
  right to that square (torchvision's ScaleJitter + FixedSizeCrop, Detectron2's ResizeScale + FixedSizeCrop).
  The padding is the ImageNet mean, which the model's normalisation maps to about 0, as it pads batches itself.

Why here and not in the model: torchvision's GeneralizedRCNNTransform resizes every training image to
model.min_size (capped by model.max_size). After a reader resize it would undo multiscale (every image back to
min_size) and rescale lsj's fixed canvas. So with these two policies the model is built not to resize in training
(train/model.py: resize_in_training=False, torchvision's own `_skip_resize`, which its detection references set
for the same presets) and resizes only in evaluation, to model.min_size / max_size. As in Detectron2, the loader
owns the training sizes and the model the evaluation size; resizing once, on uint8 images in the loader workers
with antialiasing, also sends smaller tensors to the device than resizing there would.

Every draw comes from the `rng` the reader seeds from (seed, epoch, sample key), so a sample gets the same size
and crop whichever worker or resume point reads it, and new ones each epoch. Boxes follow the image: scaled,
shifted by the crop and clipped to it; a box with a side under one pixel (a box left outside the crop has none)
is dropped with its label, iscrowd and area. `area` (the COCO segment area; only evaluation reads it) is scaled
with the image and by the share of its box that the crop kept. The flip comes first, as in Detectron2.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F

AUGMENT_POLICIES = ("hflip", "multiscale", "lsj")
PAD_VALUE = (124, 116, 104)  # the ImageNet mean as uint8: torchvision detectors normalise it to ~0
MIN_BOX_SIDE = 1.0  # pixels of the output image
PER_BOX_FIELDS = ("boxes", "labels", "iscrowd", "area")


def shortest_side_size(height: int, width: int, shorter: int, max_size: int) -> tuple[int, int]:
    """(height, width) with the shorter side `shorter`, unless the longer side would then exceed max_size."""
    scale = min(shorter / min(height, width), max_size / max(height, width))
    return max(round(height * scale), 1), max(round(width * scale), 1)


def jitter_size(height: int, width: int, factor: float, crop_size: int) -> tuple[int, int]:
    """(height, width) of the image scaled to fit a crop_size square, times `factor`."""
    scale = factor * crop_size / max(height, width)
    return max(round(height * scale), 1), max(round(width * scale), 1)


def resize(image: torch.Tensor, target: dict, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """The uint8 image resized to `size` (antialiased), its boxes and areas scaled with it."""
    height, width = image.shape[-2:]
    if (height, width) == size:
        return image, target
    scale_y, scale_x = size[0] / height, size[1] / width
    image = F.resize(image, list(size), antialias=True)
    target = {**target, "boxes": target["boxes"] * torch.tensor([scale_x, scale_y, scale_x, scale_y])}
    if "area" in target:
        target["area"] = target["area"] * (scale_x * scale_y)
    return image, target


def crop_and_pad(image: torch.Tensor, target: dict, top: int, left: int, size: int) -> tuple[torch.Tensor, dict]:
    """The size x size square at (top, left) of the image, padded at the bottom and right with PAD_VALUE where the
    image ends; boxes shifted and clipped to the image part of the square."""
    crop = image[:, top:top + size, left:left + size]
    canvas = torch.tensor(PAD_VALUE, dtype=image.dtype).view(3, 1, 1).repeat(1, size, size)
    canvas[:, :crop.shape[1], :crop.shape[2]] = crop
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    clipped = torch.stack([boxes[:, 0].clamp(0, crop.shape[2]), boxes[:, 1].clamp(0, crop.shape[1]),
                           boxes[:, 2].clamp(0, crop.shape[2]), boxes[:, 3].clamp(0, crop.shape[1])], 1)
    target = {**target, "boxes": clipped}
    if "area" in target:
        target["area"] = target["area"] * (_box_area(clipped) / _box_area(boxes).clamp(min=1e-6))
    return canvas, target


def drop_small_boxes(target: dict) -> dict:
    """The target without boxes that have a side under MIN_BOX_SIDE, and without their other per-box fields."""
    sides = target["boxes"][:, 2:] - target["boxes"][:, :2]
    keep = (sides >= MIN_BOX_SIDE).all(1)
    if keep.all():
        return target
    return {key: value[keep] if key in PER_BOX_FIELDS else value for key, value in target.items()}


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


@dataclass(frozen=True)
class Multiscale:
    """`multiscale`: the shorter side drawn from `scales`, the longer capped at `max_size`."""

    scales: tuple[int, ...]
    max_size: int

    def __call__(self, image: torch.Tensor, target: dict, rng: random.Random) -> tuple[torch.Tensor, dict]:
        height, width = image.shape[-2:]
        image, target = resize(image, target, shortest_side_size(height, width, rng.choice(self.scales),
                                                                 self.max_size))
        return image, drop_small_boxes(target)


@dataclass(frozen=True)
class LargeScaleJitter:
    """`lsj`: scaled by a factor from `jitter_range` relative to a `crop_size` square, then cut or padded to it."""

    jitter_range: tuple[float, float]
    crop_size: int

    def __call__(self, image: torch.Tensor, target: dict, rng: random.Random) -> tuple[torch.Tensor, dict]:
        height, width = image.shape[-2:]
        size = jitter_size(height, width, rng.uniform(*self.jitter_range), self.crop_size)
        image, target = resize(image, target, size)
        top = rng.randint(0, max(size[0] - self.crop_size, 0))
        left = rng.randint(0, max(size[1] - self.crop_size, 0))
        image, target = crop_and_pad(image, target, top, left, self.crop_size)
        return image, drop_small_boxes(target)


ScaleAugmentation = Multiscale | LargeScaleJitter
