"""Render a synthetic COCO-format product dataset (bottles, boxes, cans, shoes, bags) for detector training.

Each image is a textured background with 1 to 6 products drawn as recognisable, lightly shaded shapes in
several colours and sizes, some overlapping or cut by the image border. A product's main colour (body, box
front, shoe upper) is one of the palette's (common/colour_palette.py), and its annotation records that colour's
name as {"attributes": {"colour": NAME}}; caps, labels, bands and soles take other colours. Every image is
rendered from its own random generator seeded by (seed, image index), so the output is byte-identical for a given seed
whatever the worker count (given the same numpy and Pillow builds). Boxes are the tight box of each
object's drawn pixels, clipped to the image; an occluded object keeps its full-object box, as in COCO,
and placement never hides more than half of an object. There are no segmentation masks: `area` is the
box area.

Writes OUT/images/000001.jpg ... and OUT/annotations/instances.json (written last, atomically).
"""

import argparse
import io
import json
import math
import os
import shutil
import sys
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.atomic_io import write_json_atomically
from common.colour_palette import reference_rgb

# Sparse ids, like COCO's, so that the id -> contiguous label mapping downstream is exercised.
CATEGORIES = [
    {"id": 1, "name": "bottle", "supercategory": "product"},
    {"id": 3, "name": "box", "supercategory": "product"},
    {"id": 4, "name": "can", "supercategory": "product"},
    {"id": 7, "name": "shoe", "supercategory": "product"},
    {"id": 9, "name": "bag", "supercategory": "product"},
]

# A product's main colour is a palette colour, recorded with its name as the annotation's attributes.colour.
# This order (and the palette's first anchors) keeps the images those of earlier versions, colour for colour.
PRODUCT_COLOUR_NAMES = ("red", "blue", "green", "yellow", "orange", "purple",
                        "white", "black", "brown", "cyan", "pink", "grey")
PRODUCT_COLOURS = [reference_rgb(name) for name in PRODUCT_COLOUR_NAMES]
ACCENT_COLOURS = [
    (250, 250, 250), (20, 20, 20), (220, 180, 40), (200, 30, 40), (30, 90, 190), (190, 190, 200),
]

SUPERSAMPLE = 2  # objects are drawn at twice their size and reduced, which anti-aliases their edges
MIN_VISIBLE_FRACTION = 0.5  # a new object may not hide more than half of one already placed
ALPHA_VISIBLE = 64  # anti-aliased edge pixels fainter than this are not part of the object or its box
PLACEMENT_TRIES = 12
MIN_OBJECT_SIZE = 10  # pixels, long side
JPEG_QUALITY = 90


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 18) -> tuple[int, ...]:
    return tuple(int(c) for c in np.clip(np.array(colour) + rng.integers(-amount, amount + 1, 3), 0, 255))


def _pick(rng: np.random.Generator, colours: list, exclude: tuple | None = None) -> tuple[int, ...]:
    choices = [c for c in colours if c != exclude]
    return _jitter(rng, choices[rng.integers(len(choices))])


def _pick_product_colour(rng: np.random.Generator) -> tuple[str, tuple[int, ...]]:
    """(palette name, jittered colour) of a product's main colour; the same draws as _pick(rng, PRODUCT_COLOURS)."""
    index = int(rng.integers(len(PRODUCT_COLOURS)))
    return PRODUCT_COLOUR_NAMES[index], _jitter(rng, PRODUCT_COLOURS[index])


def _scale(colour: tuple[int, ...], factor: float) -> tuple[int, ...]:
    return tuple(int(min(255, c * factor)) for c in colour)


# ---- products: each draws a silhouette on a transparent canvas of the object's (supersampled) size and
# returns the palette name of its main colour ----


def _draw_bottle(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> str:
    (colour, body), cap, label = _pick_product_colour(rng), _pick(rng, ACCENT_COLOURS), _pick(rng, ACCENT_COLOURS)
    neck_w = w * rng.uniform(0.3, 0.42)
    neck_x0 = (w - neck_w) / 2
    shoulder_top = h * rng.uniform(0.22, 0.32)
    draw.rounded_rectangle([0, shoulder_top + h * 0.08, w - 1, h - 1], radius=w * 0.15, fill=body)
    draw.ellipse([0, shoulder_top, w - 1, shoulder_top + h * 0.22], fill=body)
    draw.rectangle([neck_x0, h * 0.1, neck_x0 + neck_w, shoulder_top + h * 0.05], fill=body)
    cap_w = neck_w * 1.15
    draw.rectangle([(w - cap_w) / 2, 0, (w + cap_w) / 2, h * 0.11], fill=cap)
    draw.rectangle([0, h * rng.uniform(0.5, 0.58), w - 1, h * rng.uniform(0.76, 0.84)], fill=label)
    return colour


def _draw_can(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> str:
    (colour, body), band = _pick_product_colour(rng), _pick(rng, ACCENT_COLOURS)
    lid = _jitter(rng, (200, 200, 205), 10)
    rim = w * 0.2
    draw.rectangle([0, rim / 2, w - 1, h - rim / 2], fill=body)
    draw.ellipse([0, h - rim, w - 1, h - 1], fill=_scale(body, 0.8))
    for top in (h * rng.uniform(0.14, 0.2), h * rng.uniform(0.7, 0.78)):
        draw.rectangle([0, top, w - 1, top + h * 0.08], fill=band)
    draw.ellipse([0, 0, w - 1, rim], fill=lid)
    draw.ellipse([w * 0.1, rim * 0.15, w * 0.9, rim * 0.85], outline=_scale(lid, 0.7), width=max(1, w // 30))
    return colour


def _draw_box(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> str:
    (colour, front), accent = _pick_product_colour(rng), _pick(rng, ACCENT_COLOURS)
    depth = min(w, h) * rng.uniform(0.18, 0.3)
    draw.rectangle([0, depth, w - depth, h - 1], fill=front)
    draw.polygon([(0, depth), (depth, 0), (w - 1, 0), (w - depth, depth)], fill=_scale(front, 1.3))
    side = [(w - depth, depth), (w - 1, 0), (w - 1, h - depth), (w - depth, h - 1)]
    draw.polygon(side, fill=_scale(front, 0.65))
    face_w, face_h = w - depth, h - depth
    if rng.random() < 0.5:
        stripe = [face_w * 0.1, depth + face_h * 0.35, face_w * 0.9, depth + face_h * 0.55]
        draw.rectangle(stripe, fill=accent)
    else:
        r = min(face_w, face_h) * 0.22
        cx, cy = face_w / 2, depth + face_h / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=accent)
    return colour


def _draw_shoe(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> str:
    (colour, upper), sole, laces = _pick_product_colour(rng), _pick(rng, ACCENT_COLOURS), _pick(rng, ACCENT_COLOURS)
    sole_top = h * rng.uniform(0.72, 0.8)
    collar = h * rng.uniform(0.0, 0.12)
    draw.polygon(
        [(w * 0.02, sole_top), (w * 0.03, collar + h * 0.05), (w * 0.3, collar),
         (w * 0.42, h * 0.32), (w * 0.7, h * 0.42), (w * 0.7, sole_top)],
        fill=upper,
    )
    draw.ellipse([w * 0.35, h * 0.36, w - 1, sole_top + (sole_top - h * 0.36)], fill=upper)
    for i in range(3):
        x = w * (0.45 + 0.08 * i)
        draw.line([(x, h * (0.36 + 0.04 * i)), (x + w * 0.05, h * (0.46 + 0.04 * i))], fill=laces,
                  width=max(1, int(h * 0.05)))
    draw.rounded_rectangle([0, sole_top, w - 1, h - 1], radius=(h - sole_top) * 0.45, fill=sole)
    return colour


def _draw_bag(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> str:
    (colour, body), accent = _pick_product_colour(rng), _pick(rng, ACCENT_COLOURS)
    body_top = h * rng.uniform(0.3, 0.4)
    taper = w * rng.uniform(0.0, 0.1)
    draw.polygon([(taper, body_top), (w - 1 - taper, body_top), (w - 1, h - 1), (0, h - 1)], fill=body)
    handle_w = max(2, int(w * 0.06))
    handle = [w * 0.22, 0, w * 0.78, body_top * 2]
    draw.arc(handle, start=180, end=360, fill=_scale(body, 0.7), width=handle_w)
    body_h = h - body_top
    if rng.random() < 0.5:
        draw.rectangle([taper, body_top, w - 1 - taper, body_top + body_h * 0.25], fill=_scale(body, 0.85))
    else:
        draw.rectangle([w * 0.3, body_top + body_h * 0.4, w * 0.7, body_top + body_h * 0.6], fill=accent)
    return colour


# name -> (drawing function, height/width aspect range, shading across the width)
PRODUCTS = {
    "bottle": (_draw_bottle, (2.2, 3.3), "cylinder"),
    "box": (_draw_box, (0.6, 1.6), "flat"),
    "can": (_draw_can, (1.2, 1.9), "cylinder"),
    "shoe": (_draw_shoe, (0.35, 0.6), "flat"),
    "bag": (_draw_bag, (0.8, 1.3), "flat"),
}
CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}


def _shade(rgba: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Light the object from one side so that it does not look flat (in place, RGB only)."""
    h, w = rgba.shape[:2]
    x = (np.arange(w) + 0.5) / w
    y = (np.arange(h) + 0.5) / h
    light_x = rng.uniform(0.25, 0.45)
    if kind == "cylinder":
        across = 0.6 + 0.45 * np.sin(np.pi * x) ** 0.7 + 0.35 * np.exp(-(((x - light_x) / 0.07) ** 2))
    else:
        across = 1.05 - 0.25 * np.abs(x - light_x)
    down = 1.08 - 0.2 * y
    light = down[:, None] * across[None, :]
    rgba[..., :3] = np.clip(rgba[..., :3] * light[..., None], 0, 255)


def _render_product(name: str, w: int, h: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Return the product as an RGBA uint8 array of shape (h, w, 4), and the palette name of its main colour."""
    draw_fn, _, shading = PRODUCTS[name]
    canvas = Image.new("RGBA", (w * SUPERSAMPLE, h * SUPERSAMPLE), (0, 0, 0, 0))
    colour = draw_fn(ImageDraw.Draw(canvas), w * SUPERSAMPLE, h * SUPERSAMPLE, rng)
    rgba = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)
    _shade(rgba, shading, rng)
    if name in ("shoe", "box") and rng.random() < 0.5:  # face either way
        rgba = rgba[:, ::-1]
    return rgba.astype(np.uint8), colour


# ---- backgrounds ----


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Return a float32 (height, width, 3) background: solid, gradient, blotchy noise, stripes or tiles."""
    a = rng.integers(0, 256, 3).astype(np.float32)
    b = np.clip(a + rng.normal(0, 60, 3), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.choice(["solid", "gradient", "noise", "stripes", "tiles"])
    if kind == "solid":
        return np.broadcast_to(a, (height, width, 3)).copy()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        return a + (b - a) * t[..., None]
    if kind == "noise":
        cells = rng.integers(3, 12)
        coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32)
        return 0.5 * smooth + 0.5 * a
    if kind == "stripes":
        period = rng.uniform(8, 40)
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        t = xx * np.cos(angle) + yy * np.sin(angle)
        return np.where(((t // period) % 2 == 0)[..., None], a, b)
    tile = rng.integers(12, 48)
    grout = max(1, int(tile) // 10)
    checker = (((xx // tile) + (yy // tile)) % 2 == 0)[..., None]
    image = np.where(checker, a, 0.7 * a + 0.3 * b)
    lines = ((xx % tile) < grout) | ((yy % tile) < grout)
    return np.where(lines[..., None], 0.6 * a, image)


# ---- images ----


def _product_size(name: str, short_side: int, rng: np.random.Generator) -> tuple[int, int]:
    """Log-uniform long side from small (8% of the short side) to large (65%), with a random aspect.

    The long side is at least MIN_OBJECT_SIZE pixels so that tiny images still show recognisable shapes.
    """
    aspect = rng.uniform(*PRODUCTS[name][1])
    long_side = max(MIN_OBJECT_SIZE, short_side * math.exp(rng.uniform(math.log(0.08), math.log(0.65))))
    w, h = (long_side / aspect, long_side) if aspect >= 1 else (long_side, long_side * aspect)
    return max(3, round(w)), max(3, round(h))


def _place(width: int, height: int, w: int, h: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner; one object in six may be cut by the border, keeping at least 60% of each side."""
    if rng.random() < 1 / 6:
        x = rng.integers(-int(0.4 * w), width - int(0.6 * w) + 1)
        y = rng.integers(-int(0.4 * h), height - int(0.6 * h) + 1)
    else:
        x = rng.integers(0, max(1, width - w + 1))
        y = rng.integers(0, max(1, height - h + 1))
    return int(x), int(y)


def render_image(index: int, image_size: int, seed: int, max_aspect: float) -> tuple[bytes, int, int, list]:
    """Render image `index` (0-based) from its own generator; return (JPEG bytes, width, height, objects).

    Each object is (category name, [x, y, w, h], colour name): the tight box of its drawn pixels, clipped to the
    image, and the palette name of its main colour.
    """
    rng = np.random.default_rng([seed, index])
    long_side, short_side = image_size, max(16, round(image_size / rng.uniform(1.0, max_aspect)))
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    image = _background(width, height, rng)
    owner = np.full((height, width), -1, dtype=np.int16)  # which object each pixel shows, -1 for background
    full_area: list[int] = []  # visible pixels of each placed object when it was placed
    objects = []
    names = list(PRODUCTS)
    for _ in range(rng.integers(1, 7)):
        name = names[rng.integers(len(names))]
        w, h = _product_size(name, min(width, height), rng)
        rgba, colour = _render_product(name, w, h, rng)
        opaque = rgba[..., 3] >= ALPHA_VISIBLE
        for _ in range(PLACEMENT_TRIES):
            x, y = _place(width, height, w, h, rng)
            # the part of the object that lies inside the image, in image and in object coordinates
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
            mask = opaque[y0 - y:y1 - y, x0 - x:x1 - x]
            if mask.sum() == 0:
                continue
            hidden = np.bincount(owner[y0:y1, x0:x1][mask] + 1, minlength=len(objects) + 1)[1:]
            visible = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]
            if np.all(visible - hidden >= MIN_VISIBLE_FRACTION * np.array(full_area, dtype=np.int64)):
                break
        else:
            continue  # no place leaves the others visible enough: leave this one out
        patch = rgba[y0 - y:y1 - y, x0 - x:x1 - x].astype(np.float32)
        alpha = patch[..., 3:] / 255.0
        image[y0:y1, x0:x1] = alpha * patch[..., :3] + (1 - alpha) * image[y0:y1, x0:x1]
        owner[y0:y1, x0:x1][mask] = len(objects)
        full_area.append(int(mask.sum()))
        rows, cols = np.nonzero(mask)
        box = [x0 + int(cols.min()), y0 + int(rows.min()), int(cols.max() - cols.min()) + 1,
               int(rows.max() - rows.min()) + 1]
        objects.append((name, box, colour))
    image += rng.normal(0, 3.0, image.shape)  # sensor noise, so that flat areas are not perfectly flat
    pixels = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), width, height, objects


def _render_and_save(job: tuple[int, int, int, float, str]) -> tuple[int, int, list]:
    index, image_size, seed, max_aspect, images_dir = job
    jpeg, width, height, objects = render_image(index, image_size, seed, max_aspect)
    Path(images_dir, _file_name(index)).write_bytes(jpeg)
    return width, height, objects


def _file_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


def write_synthetic_coco(
    out_dir: str | os.PathLike,
    num_images: int = 200,
    image_size: int = 256,
    seed: int = 0,
    max_aspect: float = 1.33,
    num_workers: int = 1,
    overwrite: bool = False,
) -> Path:
    """Render the dataset into out_dir and return the path of annotations/instances.json.

    image_size is each image's long side; the short side is image_size / U(1, max_aspect), so max_aspect=1
    gives squares. Refuses an out_dir that already holds images or annotations unless overwrite, which
    removes those two folders first (so no stale images from a bigger earlier run are left behind).
    """
    for name, value, least in (("num_images", num_images, 1), ("image_size", image_size, 16),
                               ("max_aspect", max_aspect, 1), ("num_workers", num_workers, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    out_dir = Path(out_dir)
    images_dir, annotations_dir = out_dir / "images", out_dir / "annotations"
    for existing in (images_dir, annotations_dir):
        if existing.exists() and any(existing.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{existing} is not empty; pass --overwrite to replace it")
            shutil.rmtree(existing)
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations_dir.mkdir(parents=True, exist_ok=True)

    jobs = [(i, image_size, seed, max_aspect, str(images_dir)) for i in range(num_images)]
    if num_workers == 1:
        rendered = [_render_and_save(job) for job in jobs]
    else:
        with Pool(num_workers) as pool:
            rendered = pool.map(_render_and_save, jobs, chunksize=max(1, num_images // (4 * num_workers)))

    images, annotations = [], []
    for index, (width, height, objects) in enumerate(rendered):
        image_id = index + 1
        images.append({"id": image_id, "file_name": _file_name(index), "width": width, "height": height})
        for name, box, colour in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY_ID[name],
                "bbox": box, "area": box[2] * box[3], "iscrowd": 0, "attributes": {"colour": colour},
            })
    coco = {
        "info": {
            "description": "synthetic products from data_prep.synth",
            "seed": seed, "image_size": image_size, "max_aspect": max_aspect,
        },
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    annotations_path = annotations_dir / "instances.json"
    write_json_atomically(annotations_path, coco, indent=1)
    return annotations_path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory (images/ and annotations/)")
    parser.add_argument("--num-images", type=_positive_int, default=200)
    parser.add_argument("--image-size", type=_positive_int, default=256,
                        help="long side of each image in pixels")
    parser.add_argument("--max-aspect", type=float, default=1.33,
                        help="largest long/short side ratio of an image; 1 gives square images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=_positive_int, default=1,
                        help="rendering processes; the output does not depend on it")
    parser.add_argument("--overwrite", action="store_true", help="replace existing images/ and annotations/")


def run(args: argparse.Namespace) -> int:
    try:
        path = write_synthetic_coco(args.out, args.num_images, args.image_size, args.seed, args.max_aspect,
                                    args.num_workers, args.overwrite)
    except (ValueError, FileExistsError) as error:
        print(f"synth: error: {error}", file=sys.stderr)
        return 2
    coco = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = Counter(names[a["category_id"]] for a in coco["annotations"])
    counts = ", ".join(f"{name} {per_class[name]}" for name in names.values())
    print(f"synth: {len(coco['images'])} images, {len(coco['annotations'])} annotations ({counts}) "
          f"written to {path.parent.parent}")
    return 0
