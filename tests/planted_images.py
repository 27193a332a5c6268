"""A directory of real photos with known defects, and the outcome `data_prep.images` must give each.

Used by the image tests and by the shard pipeline's end-to-end test. The photos ship inside installed
packages (scikit-image's `data/` directory and matplotlib's sample data), so nothing is downloaded; they are
downscaled to at most 128 px so a test stays fast.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import skimage
from PIL import Image, ImageOps

LONGEST_SIDE = 128
# Between data_prep.images.MAX_PIXELS (80 MP) and Pillow's own bomb warning (89 MP): only our check stops it.
TOO_LARGE_SIDE = 9_000


@dataclass(frozen=True)
class PlantedImage:
    file_name: str
    width: int | None  # as the annotation file states it; None when the annotation leaves it out
    height: int | None
    expected: str  # "ok", the fix code the case is about, or the rejection reason
    expected_fixes: tuple[str, ...] = ()  # every fix code, in the order normalize_image reports them
    stored_size: tuple[int, int] | None = None  # (width, height) of the stored JPEG; None when rejected

    @property
    def rejected(self) -> bool:
        return self.stored_size is None


def photo_path(name: str) -> Path:
    """A photo shipped with scikit-image (astronaut.png, camera.png, ...) or matplotlib (grace_hopper.jpg)."""
    if name == "grace_hopper.jpg":
        return Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / name
    return Path(skimage.__file__).parent / "data" / name


def load_photo(name: str, longest_side: int = LONGEST_SIDE) -> Image.Image:
    """The photo downscaled so its longest side is `longest_side`, in its own mode (L, RGB or RGBA)."""
    with Image.open(photo_path(name)) as photo:
        scale = longest_side / max(photo.size)
        size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
        return photo.resize(size, Image.Resampling.LANCZOS)


def make_planted_images(directory: Path) -> list[PlantedImage]:
    """Write the planted files into `directory` (created if needed) and describe what each should give."""
    directory.mkdir(parents=True, exist_ok=True)
    plant = _Planter(directory)
    hopper, clean = _plant_size_and_progressive(plant)
    _plant_bit_depth_and_exif3(plant)
    astronaut = load_photo("astronaut.png")
    plant("rgb.png", _png(astronaut), astronaut.size, "reencoded_to_jpeg", ("reencoded_to_jpeg",), astronaut.size)
    _plant_palette_and_exif6(plant)
    _plant_cmyk_and_alpha(plant)
    _plant_rejections(plant, hopper, clean, astronaut)
    return plant.planted


@dataclass
class _Planter:
    """Writes each planted file and records what it should give; the planting order sets the image ids."""

    directory: Path
    planted: list[PlantedImage] = field(default_factory=list)

    def __call__(self, file_name: str, data: bytes | None, size: tuple[int | None, int | None], expected: str,
                 fixes: tuple[str, ...] = (), stored: tuple[int, int] | None = None) -> None:
        if data is not None:
            (self.directory / file_name).write_bytes(data)
        self.planted.append(PlantedImage(file_name, size[0], size[1], expected, fixes, stored))


def _plant_size_and_progressive(plant: _Planter) -> tuple[Image.Image, bytes]:
    """The clean baseline, missing and mismatched sizes, a progressive JPEG; returns the baseline photo and bytes."""
    hopper = load_photo("grace_hopper.jpg")
    clean = _jpeg(hopper, quality=90)
    plant("clean_baseline.jpg", clean, hopper.size, "ok", (), hopper.size)
    rocket = load_photo("rocket.jpg")
    plant("size_missing.jpg", _jpeg(rocket, quality=90), (None, None), "size_filled_from_file",
          ("size_filled_from_file",), rocket.size)
    plant("size_mismatch.jpg", clean, (hopper.width + 10, hopper.height), "size_mismatch")
    plant("progressive.jpg", _jpeg(rocket, quality=90, progressive=True), rocket.size,
          "progressive_to_baseline", ("progressive_to_baseline",), rocket.size)
    return hopper, clean


def _plant_bit_depth_and_exif3(plant: _Planter) -> None:
    """Grayscale, 16-bit grayscale and RGB PNGs, and a JPEG rotated 180 degrees by EXIF (size unchanged)."""
    camera = load_photo("camera.png")
    plant("grayscale.jpg", _jpeg(camera), camera.size, "grayscale_to_rgb", ("grayscale_to_rgb",), camera.size)
    gray16 = Image.fromarray(np.asarray(camera).astype(np.uint16) * 257)  # 8-bit value v -> 16-bit v * 257
    plant("gray16.png", _png(gray16), camera.size, "16bit_to_8bit",
          ("reencoded_to_jpeg", "16bit_to_8bit", "grayscale_to_rgb"), camera.size)

    motorcycle = load_photo("motorcycle_left.png")
    plant("rgb16.png", _png_rgb16(np.asarray(motorcycle)), motorcycle.size, "16bit_to_8bit",
          ("reencoded_to_jpeg", "16bit_to_8bit"), motorcycle.size)
    plant("exif3.jpg", _jpeg(motorcycle, exif_orientation=3), motorcycle.size, "exif_orientation_applied",
          ("exif_orientation_applied",), motorcycle.size)


def _plant_palette_and_exif6(plant: _Planter) -> None:
    """A palette PNG, and one EXIF-6 JPEG whose annotation states the displayed size, the raw size or none."""
    coffee = load_photo("coffee.png")  # landscape, so EXIF orientations 5..8 swap width and height
    plant("palette.png", _png(coffee.quantize(64)), coffee.size, "palette_to_rgb",
          ("reencoded_to_jpeg", "palette_to_rgb"), coffee.size)
    rotated = _jpeg(coffee, exif_orientation=6)
    portrait = coffee.size[::-1]
    plant("exif6_displayed.jpg", rotated, portrait, "exif_orientation_applied", ("exif_orientation_applied",),
          portrait)
    plant("exif6_raw.jpg", rotated, coffee.size, "exif_orientation_ignored", ("exif_orientation_ignored",),
          coffee.size)
    plant("exif6_size_missing.jpg", rotated, (None, None), "exif_orientation_applied",
          ("exif_orientation_applied", "size_filled_from_file"), portrait)


def _plant_cmyk_and_alpha(plant: _Planter) -> None:
    """A CMYK JPEG, a palette PNG with a transparent index and an RGBA cut-out."""
    chelsea = load_photo("chelsea.png")
    plant("cmyk.jpg", _jpeg(chelsea.convert("CMYK")), chelsea.size, "cmyk_to_rgb", ("cmyk_to_rgb",), chelsea.size)
    palette = chelsea.quantize(32)
    plant("palette_transparent.png", _png(palette, transparency=palette.getpixel((0, 0))), chelsea.size,
          "alpha_composited", ("reencoded_to_jpeg", "palette_to_rgb", "alpha_composited"), chelsea.size)

    cutout = _cutout(chelsea, load_photo("horse.png"))
    plant("rgba.png", _png(cutout), cutout.size, "alpha_composited", ("reencoded_to_jpeg", "alpha_composited"),
          cutout.size)


def _plant_rejections(plant: _Planter, hopper: Image.Image, clean: bytes, astronaut: Image.Image) -> None:
    """Files that must be rejected: not an image, truncated, empty, missing, or claiming too many pixels."""
    plant("undecodable.jpg", b"<html><body>404 Not Found</body></html>\n" * 20, (64, 64), "undecodable")
    plant("truncated.jpg", clean[: len(clean) * 2 // 3], hopper.size, "truncated")
    astronaut_png = _png(astronaut)
    plant("truncated.png", astronaut_png[: len(astronaut_png) // 2], astronaut.size, "truncated")
    # All pixel data present, only the IEND chunk cut off: Pillow decodes it without complaint.
    plant("truncated_end.png", astronaut_png[:-12], astronaut.size, "truncated")
    plant("empty.jpg", b"", (64, 64), "empty_file")
    plant("missing.jpg", None, (64, 64), "missing_file")
    plant("too_large.png", _png_header_only(TOO_LARGE_SIDE, TOO_LARGE_SIDE), (TOO_LARGE_SIDE, TOO_LARGE_SIDE),
          "too_large")


def _cutout(photo: Image.Image, silhouette: Image.Image) -> Image.Image:
    """An RGBA product-style cut-out: the photo, opaque where the (dark on white) silhouette is dark."""
    alpha = ImageOps.invert(silhouette.convert("L").resize(photo.size, Image.Resampling.BILINEAR))
    cutout = photo.convert("RGBA")
    cutout.putalpha(alpha)
    return cutout


def _jpeg(image: Image.Image, *, quality: int = 90, progressive: bool = False,
          exif_orientation: int | None = None) -> bytes:
    options = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[274] = exif_orientation
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, progressive=progressive, **options)
    return buffer.getvalue()


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one) whose samples are the 8-bit ones times 257."""
    height, width, _ = pixels.shape
    samples = (pixels.astype(">u2") * 257).reshape(height, width * 3)
    rows = b"".join(b"\x00" + row.tobytes() for row in samples)  # filter type 0 on every row
    return _png_file(width, height, bit_depth=16, color_type=2, idat=zlib.compress(rows))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: a decoder that trusts it would allocate width * height * 3 bytes."""
    return _png_file(width, height, bit_depth=8, color_type=2, idat=zlib.compress(b"\x00" * 64))


def _png_file(width: int, height: int, *, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
