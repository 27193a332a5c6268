"""normalize_image on real photos with planted defects: outcomes, fix codes and the stored JPEG itself."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from planted_images import PlantedImage, load_photo, make_planted_images

from data_prep.images import ImageRejected, NormalizedImage, normalize_image


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("planted")


@pytest.fixture(scope="module")
def planted(planted_dir) -> dict[str, PlantedImage]:
    return {case.file_name: case for case in make_planted_images(planted_dir)}


def normalize(planted_dir: Path, case: PlantedImage) -> NormalizedImage:
    return normalize_image(planted_dir / case.file_name, case.width, case.height)


def decoded(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def jpeg_frame_markers(jpeg: bytes) -> list[int]:
    """Every SOFn marker byte in the headers, found by walking the JPEG segments up to the first scan."""
    markers, position = [], 2
    while jpeg[position + 1] != 0xDA:
        marker = jpeg[position + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            markers.append(marker)
        position += 2 + int.from_bytes(jpeg[position + 2:position + 4], "big")
    return markers


def test_planted_set_covers_every_case_the_shard_writer_must_handle(planted):
    outcomes = {case.expected for case in planted.values()}
    assert outcomes >= {
        "ok", "grayscale_to_rgb", "palette_to_rgb", "alpha_composited", "16bit_to_8bit", "cmyk_to_rgb",
        "progressive_to_baseline", "reencoded_to_jpeg", "exif_orientation_applied", "exif_orientation_ignored",
        "size_filled_from_file", "undecodable", "truncated", "empty_file", "missing_file", "size_mismatch",
        "too_large",
    }


def test_each_planted_image_gets_its_expected_outcome(planted_dir, planted):
    wrong = []
    for case in planted.values():
        try:
            result = normalize(planted_dir, case)
        except ImageRejected as rejection:
            if rejection.reason != case.expected:
                wrong.append(f"{case.file_name}: rejected as {rejection.reason} ({rejection.detail})")
            continue
        outcome = (result.fixes, (result.width, result.height), bool(result.detail))
        if case.rejected or outcome != (case.expected_fixes, case.stored_size, bool(case.expected_fixes)):
            wrong.append(f"{case.file_name}: got {outcome}, expected {case.expected} {case.expected_fixes}")
        if case.expected != "ok" and case.expected not in result.fixes:
            wrong.append(f"{case.file_name}: {case.expected} missing from {result.fixes}")
    assert wrong == []


def test_outputs_are_baseline_8bit_rgb_jpegs_of_the_stated_size_without_orientation(planted_dir, planted):
    for case in planted.values():
        if case.rejected:
            continue
        result = normalize(planted_dir, case)
        image = decoded(result.jpeg)
        assert (image.format, image.mode, image.bits) == ("JPEG", "RGB", 8), case.file_name
        assert image.size == (result.width, result.height) == case.stored_size, case.file_name
        assert jpeg_frame_markers(result.jpeg) == [0xC0], case.file_name  # SOF0: baseline
        assert not image.info.get("progressive"), case.file_name
        assert image.getexif().get(274) is None, case.file_name
        assert result.sha256 == hashlib.sha256((planted_dir / case.file_name).read_bytes()).hexdigest()


def test_clean_baseline_jpegs_are_kept_byte_for_byte(planted_dir, planted):
    for name in ("clean_baseline.jpg", "size_missing.jpg"):
        assert normalize(planted_dir, planted[name]).jpeg == (planted_dir / name).read_bytes()
    # A re-encoded file is not its original.
    assert normalize(planted_dir, planted["progressive.jpg"]).jpeg != (planted_dir / "progressive.jpg").read_bytes()


@pytest.mark.parametrize("name", ["exif6_displayed.jpg", "exif3.jpg", "exif6_size_missing.jpg"])
def test_applied_exif_orientation_really_moves_the_pixels(planted_dir, planted, name):
    original = Image.open(planted_dir / name)
    oriented = ImageOps.exif_transpose(original)
    stored = decoded(normalize(planted_dir, planted[name]).jpeg)
    assert stored.size == oriented.size
    # Re-encoding at quality 95 changes pixels by a few levels; a wrong rotation changes them by tens.
    assert np.abs(pixels(stored) - pixels(oriented)).mean() < 3
    unrotated = pixels(original.transpose(Image.Transpose.ROTATE_180)) if name == "exif3.jpg" else None
    if unrotated is not None:  # exif3 keeps its size, so check it is not the image upside down
        assert np.abs(pixels(stored) - unrotated).mean() < 3
        assert np.abs(pixels(stored) - pixels(original)).mean() > 20


def test_ignored_exif_orientation_keeps_the_raw_pixels(planted_dir, planted):
    original = Image.open(planted_dir / "exif6_raw.jpg")
    stored = decoded(normalize(planted_dir, planted["exif6_raw.jpg"]).jpeg)
    assert stored.size == original.size
    assert np.abs(pixels(stored) - pixels(original)).mean() < 3


def test_16bit_samples_are_scaled_not_saturated(planted_dir, planted):
    for name, photo in (("gray16.png", "camera.png"), ("rgb16.png", "motorcycle_left.png")):
        reference = pixels(load_photo(photo))  # the 8-bit photo the 16-bit file was made from (values * 257)
        stored = pixels(decoded(normalize(planted_dir, planted[name]).jpeg))
        # Quality 95 with 4:2:0 chroma costs a few levels on this detailed photo; a wrong scale costs tens.
        assert np.abs(stored - reference).mean() < 6, name
        assert abs(stored.mean() - reference.mean()) < 1.5, name
        assert (stored >= 250).mean() < 0.2, name  # clipping 16-bit values to 255 would make it nearly white


def test_alpha_is_composited_onto_white(planted_dir, planted):
    rgba = np.asarray(Image.open(planted_dir / "rgba.png").convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    assert 0.05 < (alpha < 1).mean() < 0.95  # the photo really has transparent parts
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    stored = pixels(decoded(normalize(planted_dir, planted["rgba.png"]).jpeg))
    assert np.abs(stored - expected).mean() < 3

    palette = Image.open(planted_dir / "palette_transparent.png")
    transparent = np.asarray(palette) == palette.info["transparency"]
    assert transparent.any()
    stored = pixels(decoded(normalize(planted_dir, planted["palette_transparent.png"]).jpeg))
    assert stored[transparent].mean() > 245


def test_cmyk_colours_survive_conversion(planted_dir, planted):
    stored = pixels(decoded(normalize(planted_dir, planted["cmyk.jpg"]).jpeg))
    # An inverted (Adobe) CMYK read the wrong way round would give a photographic negative.
    assert np.abs(stored - pixels(load_photo("chelsea.png"))).mean() < 5


def test_reencoding_is_deterministic(planted_dir, planted):
    for case in planted.values():
        if not case.rejected:
            assert normalize(planted_dir, case) == normalize(planted_dir, case), case.file_name


def test_size_mismatch_names_both_sizes(planted_dir, planted):
    case = planted["size_mismatch.jpg"]
    with pytest.raises(ImageRejected) as caught:
        normalize(planted_dir, case)
    assert caught.value.detail == f"annotation says {case.width}x{case.height}, file is 109x128"


def test_orientation_explains_a_swapped_size_only_when_annotated_either_way(planted_dir, planted):
    raw_width, raw_height = planted["exif6_raw.jpg"].stored_size
    with pytest.raises(ImageRejected) as caught:
        normalize_image(planted_dir / "exif6_raw.jpg", raw_width, raw_width)
    assert caught.value.reason == "size_mismatch"
    assert f"({raw_width}x{raw_height} as stored, EXIF orientation 6)" in caught.value.detail


def test_invalid_orientation_value_is_removed(tmp_path):
    exif = Image.Exif()
    exif[274] = 9
    path = tmp_path / "bad_orientation.jpg"
    load_photo("coffee.png").save(path, "JPEG", quality=90, exif=exif)
    result = normalize_image(path, 128, 85)
    assert result.fixes == ("invalid_exif_removed",)
    assert decoded(result.jpeg).getexif().get(274) is None


def test_rejection_survives_the_trip_back_from_a_worker_process():
    rejection = pickle.loads(pickle.dumps(ImageRejected("truncated", "image file is truncated")))
    assert (rejection.reason, rejection.detail) == ("truncated", "image file is truncated")
