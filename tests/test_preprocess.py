from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.errors import PayloadTooLarge, UndecodableImage, UnsupportedMediaType
from service.preprocess import ImageSpec, decode_frame, decode_image, sniff_format
from tests import images

SPEC = ImageSpec(64, 96)


def plain_decode(data: bytes, spec: ImageSpec) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.resize((spec.width, spec.height), Image.Resampling.BILINEAR))


def test_real_frames_decode_to_model_input(fullres_frames: list[Path]) -> None:
    spec = ImageSpec(224, 224)
    for path in fullres_frames[:8]:
        out = decode_image(path.read_bytes(), spec)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        assert out.std() > 5, "a real frame decodes to a non-flat image"


def test_scaled_jpeg_decode_matches_full_decode(fullres_frames: list[Path]) -> None:
    """The reduced-size DCT fast path stays close to decoding at full size then resizing."""
    spec = ImageSpec(224, 224)
    for path in fullres_frames[:8]:
        data = path.read_bytes()
        fast = decode_image(data, spec).astype(np.int16)
        full = plain_decode(data, spec).astype(np.int16)
        assert np.abs(fast - full).mean() < 3.0


def test_rgb_png_round_trips_exactly() -> None:
    array = images.pattern()
    assert np.array_equal(decode_image(images.png(array), SPEC), array)


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_matches_rotating_first(orientation: int, fmt: str) -> None:
    base = images.pattern(96, 64)
    tagged = images.with_orientation(base, orientation, fmt)
    upright = Image.fromarray(base)
    from service.preprocess import _ORIENTATION_OPS

    for op in _ORIENTATION_OPS[orientation]:
        upright = upright.transpose(op)
    spec = ImageSpec(upright.height, upright.width)
    upright_bytes = images.encode(upright, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    got = decode_image(tagged, spec).astype(np.int16)
    want = decode_image(upright_bytes, spec).astype(np.int16)
    # The frame's geometry as displayed, which serving reports: the upright one's.
    assert decode_frame(tagged, spec)[1] == (upright.width, upright.height)
    tolerance = 0 if fmt == "PNG" else 4.0
    assert np.abs(got - want).mean() <= tolerance
    # And it is not trivially equal to the unrotated frame.
    if orientation in (3, 4, 2):
        assert np.abs(got - base.astype(np.int16)).mean() > 20


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    array = images.pattern()
    data = images.encode(Image.fromarray(array).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, SPEC).astype(np.int16)
    assert np.abs(out - array.astype(np.int16)).mean() < 6


def test_16bit_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 96).astype(np.uint16), (64, 1))
    data = images.encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, SPEC)
    expected = np.rint(ramp / 257.0).astype(np.int16)
    assert np.abs(out[..., 0].astype(np.int16) - expected).max() <= 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_palette_png_with_alpha_composites_on_black() -> None:
    palette_img = Image.new("P", (96, 64))
    palette_img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    pixels = np.zeros((64, 96), np.uint8)
    pixels[:, 48:] = 1
    palette_img.putdata(pixels.flatten().tolist())
    data = images.encode(palette_img, "PNG", transparency=0)  # index 0 (red) transparent
    out = decode_image(data, SPEC)
    assert (out[:, :40] == 0).all(), "transparent pixels become black"
    assert (out[:, 56:, 1] == 255).all() and (out[:, 56:, 0] == 0).all()


def test_rgba_png_premultiplies_alpha() -> None:
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 128
    out = decode_image(images.encode(Image.fromarray(rgba, "RGBA"), "PNG"), SPEC)
    assert np.abs(out.astype(int) - 100).max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_becomes_three_equal_channels(fmt: str) -> None:
    grey = images.pattern()[..., 0]
    out = decode_image(images.encode(Image.fromarray(grey, "L"), fmt), SPEC)
    assert out.shape == (64, 96, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_truncated_jpeg_is_undecodable(fullres_frames: list[Path]) -> None:
    data = fullres_frames[0].read_bytes()
    with pytest.raises(UndecodableImage):
        decode_image(data[: len(data) // 2], ImageSpec(224, 224))


def test_zero_bytes_html_and_pdf_are_rejected() -> None:
    with pytest.raises(UndecodableImage):
        decode_image(b"", SPEC)
    for payload in (images.HTML, images.PDF, b"GIF89a" + b"\x00" * 20):
        with pytest.raises(UnsupportedMediaType):
            sniff_format(payload)


def test_png_bomb_rejected_from_header_with_flat_memory() -> None:
    bomb = images.png_bomb(20000)
    assert len(bomb) < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            decode_image(bomb, ImageSpec(224, 224), max_pixels=40_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Decoding would need 400 MB (1.2 GB as RGB); rejecting from the header needs ~nothing.
    assert peak < 10 * 1024 * 1024


def test_mask_regions_black_out_fractions_of_the_frame() -> None:
    array = np.full((64, 96, 3), 200, np.uint8)
    spec = ImageSpec(64, 96, mask_regions=((0.0, 0.5, 0.25, 1.0),))
    out = decode_image(images.png(array), spec)
    assert (out[32:, :24] == 0).all()
    assert (out[:32] == 200).all() and (out[:, 24:] == 200).all()


@pytest.mark.parametrize("damage", ["flipped", "not-zlib", "not-zlib-valid-crc", "short-stream"])
def test_damaged_png_image_data_is_refused(damage: str) -> None:
    """Pillow fills unreadable PNG data with black; the service must refuse, not diagnose."""
    import struct
    import zlib

    rng = np.random.default_rng(0)
    data = images.png((rng.random((60, 80, 3)) * 255).astype(np.uint8))
    i = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[i - 4 : i])
    payload = data[i + 4 : i + 4 + length]
    if damage == "flipped":
        bad = bytearray(data)
        for k in range(i + 4 + length // 2, i + 4 + length // 2 + 16):
            bad[k] ^= 0xFF
        bad = bytes(bad)
    elif damage == "not-zlib":
        bad = data[: i + 4] + rng.bytes(length) + data[i + 4 + length :]
    elif damage == "not-zlib-valid-crc":
        bad = images.png_with_idat(data, lambda _: rng.bytes(length))
    else:  # a complete zlib stream holding too few scanlines
        raw = zlib.decompress(payload)
        bad = images.png_with_idat(data, lambda _: zlib.compress(raw[: len(raw) // 2]))
    with pytest.raises(UndecodableImage):
        decode_image(bad, SPEC)


@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_sound_pngs_of_every_kind_pass_the_integrity_check(mode: str, interlace: int) -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray((rng.random((37, 53, 3)) * 255).astype(np.uint8))
    image = (
        rgb.convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.asarray(rgb)[..., 0].astype(np.uint16) * 257)
    )
    buf = io.BytesIO()
    image.save(buf, "PNG", interlace=interlace)
    assert decode_image(buf.getvalue(), SPEC).shape == (SPEC.height, SPEC.width, 3)
