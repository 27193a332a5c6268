"""The dominant colour of each detected object, named from the palette (common/colour_palette.py).

A detection's box holds the object and some background. For each box, all boxes at once:
1. the box is sampled on a GRID x GRID lattice of its pixels (nearest pixel, no interpolation: blending the
   object's edge with the background would make colours that are in neither), so the cost does not grow
   with the box's size and every box is one slice of a single tensor;
2. the samples go to CIELAB (D65), where Euclidean distance follows perceived colour difference;
3. a few k-means iterations split them into CLUSTERS colours, seeded with the mean of the lattice's centre
   (the object), the mean of its border (the background) and then the samples farthest from the seeds so far;
4. a cluster is background when its share of the lattice's border ring is over BACKGROUND_RATIO times its
   share of the centre square: a tight box touches its object along parts of its sides, while what
   surrounds the object fills its corners and stays out of its centre;
5. each object cluster is named by its centre's nearest palette anchor; clusters of one name add up (a lit
   and a shaded side of a red can are both red), and the name covering most object pixels is the colour,
   with `share`: the fraction of the object's pixels it covers.
Nothing loops over pixels or boxes in Python; the only loops are over the k-means iterations and seeds.

What it cannot do: an object that fills its box completely and has the background's colour cannot be told
from it (then nothing is background and the whole box is the object); an object overlapping another in its
box takes the other's pixels as its own when they sit in the centre; one name per object, so a striped
object is named by its largest stripe.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from common.colour_palette import COLOUR_NAMES, PALETTE
from extract.database import Detection, DetectionAttribute

GRID = 12  # lattice points per side of a box
CLUSTERS = 4
ITERATIONS = 5
BORDER = 1  # lattice rows: the border ring's width
# a cluster is background when its share of the border ring is over this many times its share of the centre
BACKGROUND_RATIO = 2.0
CENTRE = (GRID // 4, GRID - GRID // 4)  # the centre square's rows and columns


@dataclass(frozen=True)
class ColourShare:
    name: str  # a palette name
    share: float  # fraction of the object's pixels of that colour, 0..1


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65 white) of sRGB values in 0..1, on the last axis."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                          dtype=rgb.dtype, device=rgb.device)
    xyz = linear @ to_xyz.T / torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    f = torch.where(xyz > (6 / 29) ** 3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _anchors() -> tuple[torch.Tensor, torch.Tensor]:
    """(Lab of every palette anchor [A, 3], index of its name in COLOUR_NAMES [A])."""
    rgb = [anchor for name in COLOUR_NAMES for anchor in PALETTE[name]]
    names = [index for index, name in enumerate(COLOUR_NAMES) for _ in PALETTE[name]]
    return srgb_to_lab(torch.tensor(rgb, dtype=torch.float32) / 255), torch.tensor(names)


ANCHOR_LAB, ANCHOR_NAME = _anchors()


def name_colours(lab: torch.Tensor) -> torch.Tensor:
    """Index into COLOUR_NAMES of the nearest palette anchor of each Lab colour (last axis)."""
    distances = _squared_distances(lab.reshape(-1, 3), ANCHOR_LAB.to(lab.device))
    return ANCHOR_NAME.to(lab.device)[distances.argmin(dim=1)].reshape(lab.shape[:-1])


def _ring_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [GRID * GRID] masks of the crop's border ring and of its centre square."""
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    edge = torch.minimum(torch.minimum(rows, cols), torch.minimum(GRID - 1 - rows, GRID - 1 - cols))
    low, high = CENTRE
    centre = (rows >= low) & (rows < high) & (cols >= low) & (cols < high)
    return (edge < BORDER).flatten(), centre.flatten()


BORDER_MASK, CENTRE_MASK = _ring_masks()


def _squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[..., P, K] squared distances of points [..., P, 3] to centres [..., K, 3], as |p|^2 - 2 p.c + |c|^2:
    one matrix product, no [..., P, K, 3] intermediate."""
    cross = points @ centres.transpose(-1, -2)
    return points.square().sum(-1, keepdim=True) - 2 * cross + centres.square().sum(-1).unsqueeze(-2)


def _seed_centres(pixels: torch.Tensor) -> torch.Tensor:
    """[N, CLUSTERS, 3] first centres: centre mean, border mean, then farthest-point picks."""
    centres = [pixels[:, CENTRE_MASK.to(pixels.device)].mean(1), pixels[:, BORDER_MASK.to(pixels.device)].mean(1)]
    for _ in range(CLUSTERS - 2):
        nearest = _squared_distances(pixels, torch.stack(centres, 1)).min(dim=2).values  # [N, P]
        farthest = nearest.argmax(dim=1)
        centres.append(pixels[torch.arange(len(pixels), device=pixels.device), farthest])
    return torch.stack(centres, 1)


def _nearest(pixels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[N, P, K] one-hot of each pixel's nearest centre (|p|^2 is left out: it does not change which)."""
    distances = centres.square().sum(-1).unsqueeze(1) - 2 * pixels @ centres.transpose(1, 2)
    return (distances.argmin(dim=2, keepdim=True) == torch.arange(CLUSTERS, device=pixels.device)).to(pixels.dtype)


def kmeans(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-hot cluster of each pixel [N, P, CLUSTERS], centres [N, CLUSTERS, 3]) of crops' pixels [N, P, 3]."""
    centres = _seed_centres(pixels)
    for _ in range(ITERATIONS):
        one_hot = _nearest(pixels, centres)
        counts = one_hot.sum(1)  # [N, K]
        sums = one_hot.transpose(1, 2) @ pixels  # [N, K, 3]
        # an empty cluster keeps its centre rather than collapse to zero
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
    return _nearest(pixels, centres), centres


def sample_boxes(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """[N, GRID * GRID, 3] the image's pixels (0..1) at the centres of a GRID x GRID lattice over each box."""
    steps = (torch.arange(GRID, device=boxes.device, dtype=boxes.dtype) + 0.5) / GRID
    height, width = image.shape[-2:]
    xs = (boxes[:, :1] + steps * (boxes[:, 2:3] - boxes[:, :1])).long().clamp(0, width - 1)  # [N, GRID]
    ys = (boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])).long().clamp(0, height - 1)
    pixels = image[:, ys[:, :, None], xs[:, None, :]]  # [3, N, GRID, GRID]
    return pixels.flatten(2).permute(1, 2, 0).float() / 255


def dominant_colours(image: torch.Tensor, boxes: torch.Tensor) -> list[ColourShare]:
    """The dominant colour of the object in each box: image uint8 [3, H, W], boxes [N, 4] x1, y1, x2, y2 in
    pixels (as the detectors return them). Runs on the image's device."""
    if len(boxes) == 0:
        return []
    pixels = srgb_to_lab(sample_boxes(image, boxes.to(image.device, torch.float32)))  # [N, P, 3]
    one_hot, centres = kmeans(pixels)  # [N, P, K], [N, K, 3]
    on_border = one_hot[:, BORDER_MASK.to(pixels.device)].mean(1)  # [N, K]: the border ring's fractions
    in_centre = one_hot[:, CENTRE_MASK.to(pixels.device)].mean(1)
    is_object = on_border <= BACKGROUND_RATIO * in_centre
    # a box with no object cluster (the object is its whole box, in the background's colours): all of it
    is_object |= ~is_object.any(dim=1, keepdim=True)
    cluster_pixels = one_hot.sum(1) * is_object  # [N, K]
    names = name_colours(centres)  # [N, K]
    per_name = torch.zeros(len(boxes), len(COLOUR_NAMES), device=pixels.device)
    per_name.scatter_add_(1, names, cluster_pixels)
    shares = per_name / per_name.sum(1, keepdim=True)
    best_share, best_name = shares.max(dim=1)
    return [ColourShare(COLOUR_NAMES[name], share) for name, share in zip(best_name.tolist(), best_share.tolist(),
                                                                           strict=True)]


def add_colours(image: torch.Tensor, detections: list[Detection], device: torch.device | None = None
                ) -> list[Detection]:
    """The detections, each with its colour attribute (kind "colour", palette name, share of the object), from
    the image they were found in (uint8 [3, H, W], the pixels their boxes refer to), computed on `device` (the
    model's: on a GPU the few dozen small operations cost launches, not time, whatever the number of boxes)."""
    if not detections:
        return detections
    boxes = torch.tensor([detection.box for detection in detections], dtype=torch.float32)
    colours = dominant_colours(image.to(device), boxes)
    return [replace(detection, attributes=(*detection.attributes,
                                           DetectionAttribute("colour", colour.name, colour.share)))
            for detection, colour in zip(detections, colours, strict=True)]
