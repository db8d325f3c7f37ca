"""Preprocessing version 2: the field of view is found and kept whole, its aspect is kept, and
the capture around it (frame shape, border, overlays) does not reach the model's input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from service.geometry import (
    _open,
    canonical_frame,
    ellipse_mask,
    find_bars,
    find_fov,
    fit_box,
)
from service.preprocess import ImageSpec, decode_image
from tests.conftest import require_data

V2 = ImageSpec(224, 224, version=2)


def tissue(width: int, height: int, seed: int = 0) -> Image.Image:
    """Textured reddish 'mucosa' filling the whole frame (no black anywhere)."""
    rng = np.random.default_rng(seed)
    base = np.array([180, 90, 80], np.float32)
    noise = rng.normal(0, 18, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    small = Image.fromarray(np.clip(base + noise, 40, 235).astype(np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def scope_frame(
    canvas: tuple[int, int], fov: tuple[int, int, int, int], overlays: bool = True
) -> Image.Image:
    """An octagonal field of view of tissue on black, with text and an inset box on the
    border as capture cards draw them."""
    frame = Image.new("RGB", canvas, (0, 0, 0))
    x0, y0, x1, y1 = fov
    w, h = x1 - x0, y1 - y0
    cut = min(w, h) // 6
    octagon = [
        (x0 + cut, y0), (x1 - cut, y0), (x1, y0 + cut), (x1, y1 - cut),
        (x1 - cut, y1), (x0 + cut, y1), (x0, y1 - cut), (x0, y0 + cut),
    ]  # fmt: skip
    mask = Image.new("L", canvas, 0)
    ImageDraw.Draw(mask).polygon(octagon, fill=255)
    frame.paste(tissue(*canvas), (0, 0), mask)
    if overlays:
        draw = ImageDraw.Draw(frame)
        for i, line in enumerate(["ID: 1234", "Sex: F", "12:31:07", "CVP:8"]):
            draw.text((4, 6 + 14 * i), line, fill=(240, 240, 240))
        if x0 > 40:  # an inset panel on the border, left of the field of view
            draw.rectangle((2, canvas[1] - 40, 32, canvas[1] - 4), fill=(30, 150, 60))
    return frame


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("canvas", "fov"),
    [
        ((640, 540), (60, 10, 630, 530)),  # HyperKvasir-like
        ((1920, 1080), (420, 40, 1500, 1040)),  # 16:9 card, wide black bars
        ((768, 576), (120, 20, 660, 560)),
    ],
)
def test_fov_found_despite_text_and_inset_panel(canvas: tuple, fov: tuple) -> None:
    left, top, right, bottom = find_fov(scope_frame(canvas, fov))
    tol_x, tol_y = 0.03 * canvas[0], 0.03 * canvas[1]
    assert abs(left - fov[0]) <= tol_x and abs(right - fov[2]) <= tol_x, (left, right)
    assert abs(top - fov[1]) <= tol_y and abs(bottom - fov[3]) <= tol_y, (top, bottom)


def test_frame_without_border_is_taken_whole() -> None:
    image = tissue(500, 400)
    assert find_fov(image) == (0, 0, 500, 400)
    out = canonical_frame(image, 224, 224)
    box = fit_box(500, 400, 224, 224)
    assert box == (0, 22, 224, 201)  # aspect 1.25 kept: 224 x 179, centred
    inside = ellipse_mask(224, 224, box)
    assert (out[~inside] == 0).all()
    assert out[inside].mean() > 60  # the tissue is there


def brute_open(mask: np.ndarray, radius: int) -> np.ndarray:
    """Opening by its definition: a pixel survives erosion when its whole square lies on set
    pixels inside the frame; dilation sets every pixel of a survivor's square."""
    h, w = mask.shape
    eroded = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            y0, y1, x0, x1 = y - radius, y + radius + 1, x - radius, x + radius + 1
            inside = y0 >= 0 and x0 >= 0 and y1 <= h and x1 <= w
            eroded[y, x] = inside and mask[y0:y1, x0:x1].all()
    opened = np.zeros_like(mask)
    for y, x in np.argwhere(eroded):
        opened[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = True
    return opened


@pytest.mark.parametrize("seed", range(6))
def test_opening_matches_its_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(3, 40, 2)
    radius = int(rng.integers(1, 5))
    # Blobs, not salt: some squares must survive erosion for the test to mean anything.
    blobs = rng.random((h // 4 + 2, w // 4 + 2)) < 0.6
    mask = np.kron(blobs, np.ones((4, 4), bool))[:h, :w] & (rng.random((h, w)) < 0.97)
    expected = brute_open(mask, radius)
    got = _open(mask, radius)
    assert got.shape == mask.shape and got.dtype == bool
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("canvas", [(500, 400), (400, 500), (333, 333), (640, 360)])
def test_ellipse_blackens_every_channel_outside_and_nothing_inside(canvas: tuple) -> None:
    image = tissue(*canvas, seed=3)
    out = canonical_frame(image, 150, 200)
    box = fit_box(*canvas, 200, 150)
    inside = ellipse_mask(150, 200, box)
    reference = np.zeros((150, 200, 3), np.uint8)
    resized = image.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR)
    reference[box[1] : box[3], box[0] : box[2]] = np.asarray(resized)
    reference[~inside] = 0
    assert np.array_equal(out, reference)
    assert out[inside].min() > 0  # tissue kept in all three channels


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (31, 40)])
def test_tiny_images(size: tuple[int, int]) -> None:
    image = tissue(*size)
    assert find_fov(image) == (0, 0, *size)
    out = decode_image(encode(image), V2)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_black_frame_does_not_fail() -> None:
    out = decode_image(encode(Image.new("RGB", (320, 240))), V2)
    assert out.shape == (224, 224, 3) and out.max() == 0


def test_frame_shape_and_letterbox_do_not_change_the_input() -> None:
    """The same field of view, captured by three cards, gives (almost) the same pixels."""
    fov = scope_frame((600, 500), (0, 0, 600, 500), overlays=False)
    outs = []
    for canvas, at in (((600, 500), (0, 0)), ((1280, 720), (340, 110)), ((800, 800), (100, 150))):
        frame = Image.new("RGB", canvas)
        frame.paste(fov, at)
        outs.append(coarse(decode_image(encode(frame), V2)))
    # The box is found on a thumbnail: up to ~1 % of the FOV off, which training's crop jitter
    # covers. At 28 x 28 the content must agree.
    for other in outs[1:]:
        assert np.abs(other - outs[0]).mean() < 6.0


def coarse(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((28, 28), Image.Resampling.BOX), np.float32)


def test_aspect_kept_and_ellipse_masks_corners() -> None:
    frame = scope_frame((900, 500), (100, 50, 800, 450))  # FOV 700 x 400
    out = decode_image(encode(frame), V2)
    rows = np.flatnonzero(out.max(axis=(1, 2)) > 0)
    cols = np.flatnonzero(out.max(axis=(0, 2)) > 0)
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert width >= 220 and abs(width / height - 700 / 400) < 0.08
    assert out[:20, :20].max() == 0 and out[-20:, -20:].max() == 0  # corners outside the FOV


def test_real_frames_border_found_and_aspect_kept(fullres_frames: list[Path]) -> None:
    for path in fullres_frames[::3]:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        left, top, right, bottom = find_fov(rgb)
        w, h = rgb.size
        # HyperKvasir frames: an octagonal FOV spanning (nearly) the whole frame.
        assert 0.75 * w < right - left <= w and bottom - top > 0.9 * h, (path.name, w, h)
        arr = np.asarray(rgb)
        assert arr[top:bottom, left:right].mean() >= arr.mean()  # the FOV is the bright part
        # Letterboxed into a 16:9 capture, the same FOV is found again.
        canvas = Image.new("RGB", (1920, 1080))
        scale = 1080 / h
        canvas.paste(rgb.resize((round(w * scale), 1080)), (300, 0))
        l2, t2, r2, b2 = find_fov(canvas)
        assert (
            abs((l2 - 300) / scale - left) < 0.03 * w
            and abs(r2 - 300 - right * scale) < 0.03 * w * scale
        )
        assert abs((r2 - l2) / (b2 - t2) - (right - left) / (bottom - top)) < 0.05


def test_version_one_spec_unchanged() -> None:
    """A manifest without a preprocessing version is version 1: squash, no FOV crop."""
    old = ImageSpec.from_manifest({"height": 64, "width": 96})
    assert old.version == 1
    frame = scope_frame((640, 540), (60, 10, 630, 530))
    expected = np.asarray(frame.resize((96, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(encode(frame), old), expected)
    assert ImageSpec.from_manifest(V2.to_manifest()) == V2


def test_unknown_preprocessing_version_refused() -> None:
    with pytest.raises(ValueError, match="preprocessing version"):
        ImageSpec.from_manifest({"height": 8, "width": 8, "preprocessing": {"version": 9}})


V3 = ImageSpec(150, 200, version=3)


def test_version_three_keeps_the_corners_and_still_cuts_the_bars() -> None:
    """Version 3 is version 2 without the ellipse: content in the corners survives, bars from
    another frame shape are still cut away, and the manifest says which steps ran."""
    image = tissue(200, 150)
    stored = decode_image(encode(image), V3)
    assert stored[:10, :10].min() > 0 and stored[-10:, -10:].min() > 0
    np.testing.assert_array_equal(stored, np.asarray(image))  # a borderless frame, as stored
    wide = Image.new("RGB", (480, 270))
    wide.paste(image.resize((360, 270)), (60, 0))
    assert np.abs(coarse(decode_image(encode(wide), V3)) - coarse(stored)).mean() < 6.0
    squashed = np.asarray(wide.resize((200, 150), Image.Resampling.BILINEAR))
    assert squashed[:, :10].max() == 0  # version 1 would have kept the bar
    steps = V3.to_manifest()["preprocessing"]["steps"]
    assert "fov-crop" in steps and "ellipse-mask" not in steps
    assert "ellipse-mask" in V2.to_manifest()["preprocessing"]["steps"]
    assert ImageSpec.from_manifest(V3.to_manifest()) == V3


V4 = ImageSpec(150, 200, version=4)


@pytest.mark.parametrize(
    ("canvas", "at", "content"),
    [
        ((1920, 1080), (240, 0), (1440, 1080)),  # 16:9 letterbox
        ((1280, 1024), (0, 32), (1280, 960)),  # 5:4 pillarbox
        ((1024, 768), (30, 100), (760, 570)),  # off-centre, bars on all four sides
    ],
)
def test_version_four_cuts_bars_to_the_pixel(canvas: tuple, at: tuple, content: tuple) -> None:
    """Version 3 finds a bar's edge on a thumbnail and keeps a thumbnail pixel of margin, a
    sliver of black in the input; version 4 cuts the bar to the pixel."""
    image = tissue(200, 150, seed=4)
    frame = Image.new("RGB", canvas)
    frame.paste(image.resize(content, Image.Resampling.BILINEAR), at)
    exact = (at[0], at[1], at[0] + content[0], at[1] + content[1])
    assert find_bars(frame) == exact
    loose = find_fov(frame)
    assert loose != exact and all(abs(a - b) <= 16 for a, b in zip(loose, exact, strict=True))
    out = decode_image(encode(frame), V4)
    assert min(out[:, 0].max(), out[:, -1].max(), out[0].max(), out[-1].max()) > 0
    stored = np.asarray(image, np.float32)
    assert np.abs(out.astype(np.float32) - stored).mean() < 4.0
    sliver = decode_image(encode(frame), V3)
    assert np.abs(sliver.astype(np.float32) - stored).mean() > np.abs(out - stored).mean()


def test_version_four_is_version_one_on_any_frame_without_bars() -> None:
    """Dermoscopy frames as stored have no bars: version 4 gives the pixels version 1 gave,
    so a model trained with version 1 can be served with version 4 unchanged. A frame of
    another shape is squashed as version 1 squashes it, not padded into bars."""
    v1 = ImageSpec(150, 200, version=1)
    for size in ((400, 300), (300, 300), (600, 400)):
        image = tissue(*size, seed=5)
        np.testing.assert_array_equal(
            decode_image(encode(image), V4), decode_image(encode(image), v1)
        )
    assert "bar-crop" in V4.to_manifest()["preprocessing"]["steps"]
    assert ImageSpec.from_manifest(V4.to_manifest()) == V4
    for size in ((1, 1), (31, 40)):
        assert find_bars(tissue(*size)) == (0, 0, *size)
    assert find_bars(Image.new("RGB", (320, 240))) == (0, 0, 320, 240)


def test_version_four_never_cuts_dark_or_bright_content_at_the_edge() -> None:
    """A dark lesion reaching the frame's left edge and bright skin along its right edge are
    content: version 3's field-of-view search cuts the dark one away, version 4 cuts only
    rows and columns that are bar from end to end."""
    pixels = np.asarray(tissue(200, 150, seed=6)).copy()
    pixels[25:125, :90] = (25, 12, 10)  # pigment, darker than the tissue's own shadows
    pixels[:, 170:] = (250, 248, 247)  # over-exposed skin
    image = Image.fromarray(pixels)
    assert find_fov(image) != (0, 0, 200, 150)
    assert find_bars(image) == (0, 0, 200, 150)
    boxed = Image.new("RGB", (1920, 1080))
    boxed.paste(image.resize((1440, 1080), Image.Resampling.BILINEAR), (240, 0))
    assert find_bars(boxed) == (240, 0, 1680, 1080)


def test_version_four_on_real_dermoscopy() -> None:
    """On stored HAM10000 images version 4 changes (almost) no input from version 1; in a
    16:9 letterbox it restores the stored input where version 1 squashes in the bars."""
    root = require_data("ham10000")
    paths = sorted(root.glob("images/*/*.jpg"))[::97][:60]
    v1 = ImageSpec(150, 200, version=1)
    same, gaps = 0, []
    for path in paths:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        stored = decode_image(encode(rgb), v1).astype(np.float32)
        same += np.array_equal(decode_image(encode(rgb), V4), stored)
        frame = Image.new("RGB", (1920, 1080))
        frame.paste(rgb.resize((1440, 1080), Image.Resampling.BILINEAR), (240, 0))
        boxed = encode(frame)
        gaps.append(
            (
                np.abs(decode_image(boxed, V4) - stored).mean(),
                np.abs(decode_image(boxed, v1) - stored).mean(),
            )
        )
    assert same >= 0.95 * len(paths)
    four, one = np.array(gaps).T
    assert np.median(four) < 3.0 and (four < one).all()
