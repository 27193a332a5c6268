"""The pieces of torchvision's detection reference (references/detection as of torchvision 0.29: train.py,
engine.py, coco_utils.py) that the benchmarks compare our training path with: its COCO dataset, the boxes part
of ConvertCocoPolysToMask with the "hflip" preset, its collate function and engine.train_one_epoch's step.
"""

from __future__ import annotations

import math

import torch
from torchvision.datasets import CocoDetection
from torchvision.transforms import functional as F


class ReferenceCocoDetection(CocoDetection):
    """coco_utils.CocoDetection: the target becomes {"image_id", "annotations"} before the transforms."""

    def __init__(self, img_folder: str, ann_file: str, transforms):
        super().__init__(img_folder, ann_file)
        self._transforms = transforms

    def __getitem__(self, idx):
        img, target = super().__getitem__(idx)
        target = dict(image_id=self.ids[idx], annotations=target)
        return self._transforms(img, target)


class ReferenceTrainTransform:
    """ConvertCocoPolysToMask without masks (there are none), then the "hflip" preset:
    RandomHorizontalFlip(0.5), PILToTensor, ToDtype(float, scale=True). Category ids become our contiguous
    labels, as the model has K+1 classes (the reference trains 91 and uses the ids directly)."""

    def __init__(self, label_of_category: dict[int, int], hflip_prob: float = 0.5):
        self.label_of_category = label_of_category
        self.hflip_prob = hflip_prob

    def __call__(self, image, target):
        w, h = image.size
        anno = [obj for obj in target["annotations"] if obj.get("iscrowd", 0) == 0]
        boxes = torch.as_tensor([obj["bbox"] for obj in anno], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        labels = torch.tensor([self.label_of_category[obj["category_id"]] for obj in anno], dtype=torch.int64)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": target["image_id"],
            "area": torch.tensor([obj["area"] for obj in anno], dtype=torch.float32),
            "iscrowd": torch.tensor([obj.get("iscrowd", 0) for obj in anno], dtype=torch.int64),
        }
        if torch.rand(1) < self.hflip_prob:
            image = F.hflip(image)
            target["boxes"][:, [0, 2]] = w - target["boxes"][:, [2, 0]]
        image = F.convert_image_dtype(F.pil_to_tensor(image), torch.float)
        return image, target


def collate_fn(batch):
    return tuple(zip(*batch, strict=True))


def reference_train_step(model, optimizer, lr_scheduler, scaler, images, targets, device, amp_dtype) -> None:
    """engine.train_one_epoch's body on one process (reduce_dict is the identity there)."""
    images = list(image.to(device) for image in images)
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
    loss_value = losses.item()
    if not math.isfinite(loss_value):
        raise RuntimeError(f"baseline: loss is {loss_value} ({loss_dict}); the reference stops here")
    optimizer.zero_grad()
    if scaler is not None:
        scaler.scale(losses).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        losses.backward()
        optimizer.step()
    lr_scheduler.step()
    for value in loss_dict.values():  # MetricLogger.update(loss=..., **loss_dict) calls .item() on each
        value.item()
