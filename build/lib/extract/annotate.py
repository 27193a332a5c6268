"""Annotated images: the detections drawn on the image, for a person to check what the model found."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from extract.database import Detection
from extract.inputs import Loaded

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4")


def write_annotated(item: Loaded, detections: list[Detection], out_dir: Path) -> Path:
    """The image with its boxes and "name score" labels drawn, as PNG; named by input position and source."""
    image = item.image
    if detections:
        colors = [PALETTE[d.category_id % len(PALETTE)] for d in detections]
        labels = [f"{d.name} {d.score:.2f}" for d in detections]
        boxes = torch.tensor([d.box for d in detections])
        image = draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=2)
    path = out_dir / f"{item.index:06d}_{Path(item.source).stem}.png"
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
    return path
