"""Validate one input image and turn it into the baseline 8-bit RGB JPEG a shard stores (docs/data_format.md).

Every call ends in a `NormalizedImage`, whose `fixes` name each change made, or an `ImageRejected` with a
reason code: an image is never dropped or altered silently. A file that already is a baseline RGB JPEG
with nothing to fix is kept byte for byte; anything else is decoded once and re-encoded deterministically
(quality 95, 4:2:0, no metadata), so the same input always gives the same shard bytes.

Fix codes appear in the order they are decided: size and EXIF orientation, then the container
(`reencoded_to_jpeg`, `progressive_to_baseline`, `reencoded_to_baseline`), then the pixels
(`16bit_to_8bit`, `palette_to_rgb`, `grayscale_to_rgb`, `cmyk_to_rgb`, `color_space_to_rgb`,
`alpha_composited`).

Limits: CMYK is converted with Pillow's plain formula (embedded ICC profiles are not applied); 16-bit
samples are detected from the mode and, for PNG, from its header (Pillow decodes 16-bit RGB PNGs to their
high byte); of an animated or multi-page file only the first frame is used.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

JPEG_QUALITY = 95
# Well above any camera photo (a 61 MP sensor), below Pillow's own decompression-bomb warning (89 MP).
MAX_PIXELS = 80_000_000

_READABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
_JPEG_FORMATS = ("JPEG", "MPO")  # Pillow calls a camera JPEG with multi-picture data "MPO"
_ORIENTATION_TAG = 274
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_JPEG_BASELINE = 0xC0
_JPEG_PROGRESSIVE = (0xC2, 0xC6, 0xCA, 0xCE)
_JPEG_NOT_FRAME = (0xC4, 0xC8, 0xCC)  # DHT, JPG and DAC share the 0xC0-0xCF range with the SOFn markers
_JPEG_START_OF_SCAN = 0xDA
_PNG_END = b"IEND\xaeB`\x82"  # IEND chunk type and its fixed CRC
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_GRAYSCALE_MODES = ("1", "L", "LA", "La")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is a short snake_case code for the report, `detail` human text."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Raised in worker processes: rebuild from both fields, not from the single formatted message.
        return type(self), (self.reason, self.detail)


@dataclass(frozen=True)
class NormalizedImage:
    jpeg: bytes  # what goes into the shard as KEY.jpg
    width: int  # of the stored image
    height: int
    sha256: str  # of the ORIGINAL file bytes (used for duplicate detection)
    fixes: tuple[str, ...]  # snake_case codes of the fixes applied, e.g. ("grayscale_to_rgb",)
    detail: str  # human text for the report when fixes is non-empty ("" otherwise)


def normalize_image(path: Path, annotated_width: int | None, annotated_height: int | None) -> NormalizedImage:
    """The image at `path` as a shard JPEG, checked against the size its annotation file states.

    Raises `ImageRejected` (missing_file, unreadable, empty_file, undecodable, truncated, too_large,
    size_mismatch, unsupported_mode) when it cannot be used.
    """
    data = _read(path)
    image = _decode(data)
    fixes: list[tuple[str, str]] = []  # (code, human text)
    orientation = _check_size_and_orientation(image, annotated_width, annotated_height, fixes)
    container_fixes = _container_fixes(image, data)
    fixes += container_fixes
    # A baseline (SOF0) frame also means 8-bit samples: such a file needs nothing, keep its exact bytes.
    if not container_fixes and image.mode == "RGB" and orientation is None:
        return _result(data, image.size, data, fixes)

    if orientation == "apply":
        image = ImageOps.exif_transpose(image)
    rgb = _to_rgb(image, data, fixes)
    return _result(_encode_jpeg(rgb), rgb.size, data, fixes)


def _result(jpeg: bytes, size: tuple[int, int], original: bytes, fixes: list[tuple[str, str]]) -> NormalizedImage:
    return NormalizedImage(
        jpeg=jpeg, width=size[0], height=size[1], sha256=hashlib.sha256(original).hexdigest(),
        fixes=tuple(code for code, _ in fixes), detail="; ".join(text for _, text in fixes),
    )


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ImageRejected("missing_file", f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageRejected("unreadable", f"{path}: {error}") from error
    if not data:
        raise ImageRejected("empty_file", f"{path} has 0 bytes")
    return data


def _decode(data: bytes) -> Image.Image:
    """Open and fully decode, so truncation and corruption surface here (LOAD_TRUNCATED_IMAGES stays off)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_READABLE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected("too_large", str(error)) from error
    except UnidentifiedImageError as error:
        raise ImageRejected("undecodable", f"not an image in a supported format {_READABLE_FORMATS}") from error
    except Exception as error:  # Pillow's plugins raise many exception types on malformed headers
        raise _decode_failure(error) from error

    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageRejected("too_large", f"{width}x{height} is over the {MAX_PIXELS} pixel limit")
    try:
        image.load()
    except Exception as error:  # as above, for malformed pixel data
        raise _decode_failure(error) from error
    if image.format == "PNG" and data.rfind(_PNG_END) == -1:
        raise ImageRejected("truncated", "PNG has no IEND chunk: the file was cut short")
    return image


def _decode_failure(error: Exception) -> ImageRejected:
    message = f"{type(error).__name__}: {error}"
    return ImageRejected("truncated" if "truncated" in message.lower() else "undecodable", message)


def _exif_orientation(image: Image.Image) -> object:
    """The EXIF orientation value (None when absent), or "unreadable" when the EXIF block cannot be parsed."""
    try:
        return image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # a malformed EXIF block raises from deep inside Pillow's TIFF parser
        return "unreadable"


def _check_size_and_orientation(image: Image.Image, annotated_width: int | None,
                                annotated_height: int | None, fixes: list[tuple[str, str]]) -> str | None:
    """Match the annotated size to the file and decide what to do with an EXIF orientation.

    Returns None when there is no orientation other than 1, else "apply" (annotations were made on the
    displayed image), "ignore" (the annotated size is the raw one, not the displayed one: annotations were
    made on the raw pixels) or "remove" (a value outside 1..8). The stored image never keeps the tag.
    """
    raw = image.size
    orientation = _exif_orientation(image)
    displayed = raw[::-1] if orientation in _SWAPPING_ORIENTATIONS else raw

    def annotation_fits(size: tuple[int, int]) -> bool:
        return annotated_width in (None, size[0]) and annotated_height in (None, size[1])

    action = None
    valid = orientation in range(2, 9)
    if orientation not in (None, 1) and not valid:
        action = "remove"
        fixes.append(("invalid_exif_removed", f"EXIF orientation {orientation!r} is not 1..8; EXIF removed"))
    elif valid and annotation_fits(displayed):
        action = "apply"
        fixes.append(("exif_orientation_applied", f"EXIF orientation {orientation} applied"))
    elif valid and annotation_fits(raw):
        action = "ignore"
        displayed = raw
        fixes.append(("exif_orientation_ignored",
                      f"EXIF orientation {orientation} not applied: the annotated size "
                      f"{_size_text(annotated_width, annotated_height)} is that of the raw pixels"))

    if not annotation_fits(displayed):
        shown = f"{displayed[0]}x{displayed[1]}"
        if displayed != raw:
            shown += f" ({raw[0]}x{raw[1]} as stored, EXIF orientation {orientation})"
        raise ImageRejected("size_mismatch",
                            f"annotation says {_size_text(annotated_width, annotated_height)}, file is {shown}")
    if annotated_width is None or annotated_height is None:
        fixes.append(("size_filled_from_file", f"size {displayed[0]}x{displayed[1]} taken from the file"))
    return action


def _size_text(width: int | None, height: int | None) -> str:
    return f"{'?' if width is None else width}x{'?' if height is None else height}"


def _container_fixes(image: Image.Image, data: bytes) -> list[tuple[str, str]]:
    """Why the file cannot be stored as it is: not a JPEG, or a JPEG that is not baseline."""
    if image.format not in _JPEG_FORMATS:
        return [("reencoded_to_jpeg", f"{image.format} re-encoded as JPEG")]
    frame = _jpeg_frame_marker(data)
    if frame == _JPEG_BASELINE:
        return []
    if frame in _JPEG_PROGRESSIVE:
        return [("progressive_to_baseline", "progressive JPEG re-encoded as baseline")]
    name = "unknown" if frame is None else f"SOF{frame - 0xC0}"
    return [("reencoded_to_baseline", f"JPEG frame type {name} re-encoded as baseline")]


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The SOFn marker byte (0xC0 baseline, 0xC2 progressive, ...) read from the JPEG headers."""
    position = 2  # after SOI
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in _JPEG_NOT_FRAME:
            return marker
        if marker == _JPEG_START_OF_SCAN:
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def _to_rgb(image: Image.Image, data: bytes, fixes: list[tuple[str, str]]) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, recording each conversion."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        image, scaling = _to_8bit_gray(image)
        fixes.append(("16bit_to_8bit", f"mode {mode} scaled to 8 bits ({scaling})"))
    elif image.format == "PNG" and _png_bit_depth(data) == 16:
        fixes.append(("16bit_to_8bit", f"16-bit {mode} PNG decoded to 8 bits (high byte of each sample)"))

    if image.mode in ("P", "PA"):
        has_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        fixes.append(("palette_to_rgb", f"palette image ({mode}) converted to RGB"))
    elif image.mode in _GRAYSCALE_MODES:
        image = image.convert("RGBA" if image.mode in _ALPHA_MODES else "RGB")
        fixes.append(("grayscale_to_rgb", f"grayscale image ({mode}) converted to RGB"))
    elif image.mode == "CMYK":
        image = image.convert("RGB")
        fixes.append(("cmyk_to_rgb", "CMYK converted to RGB"))
    elif image.mode not in ("RGB", "RGBA", "RGBa", "RGBX"):
        try:
            image = image.convert("RGB")
        except ValueError as error:
            raise ImageRejected("unsupported_mode", f"mode {mode} cannot be converted to RGB: {error}") from error
        fixes.append(("color_space_to_rgb", f"mode {mode} converted to RGB"))

    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
        fixes.append(("alpha_composited", "transparency composited onto white"))
    return image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> tuple[Image.Image, str]:
    """Scale by the range the samples can take (16-bit: the high byte), never by clipping."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.min() >= 0 and pixels.max() <= 0xFFFF):
        # Mode I is how Pillow holds 16-bit samples from PPM and TIFF files.
        return Image.fromarray((pixels >> 8).astype(np.uint8), "L"), "high byte of 16-bit samples"
    low, high = float(pixels.min()), float(pixels.max())
    if image.mode == "F" and 0.0 <= low and high <= 1.0:
        return Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8), "L"), "float 0..1 times 255"
    span = high - low if high > low else 1.0
    stretched = np.rint((pixels.astype(np.float64) - low) * (255.0 / span)).astype(np.uint8)
    return Image.fromarray(stretched, "L"), f"values {low:g}..{high:g} stretched to 0..255"


def _png_bit_depth(data: bytes) -> int | None:
    """Bits per sample from the IHDR chunk, which the PNG standard puts first."""
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else None


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # No exif or icc_profile arguments: the stored JPEG carries no metadata, so no orientation tag either.
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False, progressive=False)
    return buffer.getvalue()
