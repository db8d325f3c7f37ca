"""Capture augmentation: every change a new capture set-up could bring, drawn at random.

Applied to the frame as stored, before the serving preprocessing, so a model trains on what
the service would make of a frame from another scope, card or hospital: other frame shapes
(letterbox / pillarbox at random offsets), crops with aspect jitter, rotations and flips,
other light and white balance, blur, JPEG re-compression, lower resolution, and overlays
(text, blanked boxes, a green inset panel, marker icons) at random places, black or white
bars. Each class gets
the same changes, so none of them can stay a class cue; the blanked lower-left thumbnail that
most non-polyp frames carry is added to frames of every class for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from training import capture

# Frame shapes of common capture cards and displays (width / height).
ASPECTS = (1.0, 5 / 4, 4 / 3, 1.19, 16 / 10, 16 / 9)
WORDS = ("ID", "Name", "Sex", "Age", "D.O.B", "CVP", "Eh", "Cm", "Drop", "Buf", "Mbit/s", "A5")


@dataclass(frozen=True)
class CaptureAugment:
    """Probabilities and ranges of each change (defaults: the shipped endoscopy recipe)."""

    p_crop: float = 0.6
    crop_scale: tuple[float, float] = (0.6, 1.0)  # share of each side kept
    p_letterbox: float = 0.5
    p_white_bars: float = 0.15  # of letterboxed frames
    p_flip: float = 0.5
    p_rot90: float = 0.25
    p_rotate: float = 0.3
    max_degrees: float = 20.0
    p_colour: float = 0.8
    brightness: tuple[float, float] = (0.75, 1.25)
    contrast: tuple[float, float] = (0.75, 1.25)
    saturation: tuple[float, float] = (0.75, 1.25)
    hue: float = 0.02
    white_balance: float = 0.12  # per-channel gain in 1 +/- this
    p_blur: float = 0.2
    p_lowres: float = 0.25
    lowres: tuple[float, float] = (0.35, 0.8)
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 95)
    p_corner_box: float = 0.8  # the blanked thumbnail, lower left
    p_box: float = 0.3  # a blanked box at another corner
    p_green: float = 0.25
    p_text: float = 0.6
    p_marker: float = 0.4

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return augment(image, self, rng)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _corner_rect(
    rng: np.random.Generator, corner: int, w: tuple[float, float], h: tuple[float, float]
) -> tuple[float, float, float, float]:
    bw, bh = _u(rng, *w), _u(rng, *h)
    x0 = 0.0 if corner in (0, 2) else 1.0 - bw
    y0 = 0.0 if corner in (0, 1) else 1.0 - bh
    return x0, y0, x0 + bw, y0 + bh


def _frame_shape(image: Image.Image, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of another capture's frame around ``image``: a common aspect, jittered,
    up to 1.6 times as tall."""
    aspect = ASPECTS[rng.integers(len(ASPECTS))] * _u(rng, 0.95, 1.05)
    height = int(rng.integers(image.height, int(image.height * 1.6) + 1))
    return round(height * aspect), height


def _random_text(rng: np.random.Generator) -> list[str]:
    lines = []
    for _ in range(int(rng.integers(1, 6))):
        if rng.random() < 0.5:
            lines.append(
                f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d}"
            )
        else:
            lines.append(f"{WORDS[rng.integers(len(WORDS))]}: {rng.integers(0, 99)}")
    return lines


def colour_jitter(
    image: Image.Image, a: CaptureAugment | DermoscopyAugment, rng: np.random.Generator
) -> Image.Image:
    """Another light or camera: white-balance gains, then brightness, contrast, saturation
    and hue, within the recipe's ranges."""
    wb = a.white_balance
    out = capture.white_balance(image, tuple(_u(rng, 1 - wb, 1 + wb) for _ in range(3)))
    return capture.adjust(
        out, _u(rng, *a.brightness), _u(rng, *a.contrast), _u(rng, *a.saturation),
        _u(rng, -a.hue, a.hue),
    )  # fmt: skip


def overlays(image: Image.Image, a: CaptureAugment, rng: np.random.Generator) -> Image.Image:
    out = image
    if rng.random() < a.p_corner_box:
        out = capture.box(out, _corner_rect(rng, 2, (0.2, 0.36), (0.22, 0.36)))
    if rng.random() < a.p_box:
        out = capture.box(out, _corner_rect(rng, int(rng.integers(4)), (0.1, 0.3), (0.1, 0.3)))
    if rng.random() < a.p_green:
        out = capture.green_inset(
            out, _corner_rect(rng, int(rng.integers(4)), (0.12, 0.3), (0.12, 0.3))
        )
    if rng.random() < a.p_text:
        colour = tuple(int(c) for c in rng.integers(150, 256, 3))
        out = capture.text(
            out,
            _random_text(rng),
            _u(rng, 0.0, 0.85),
            _u(rng, 0.0, 0.8),
            _u(rng, 0.02, 0.05),
            colour,
        )
    if rng.random() < a.p_marker:
        out = capture.marker(out, _u(rng, 0.03, 0.97), _u(rng, 0.03, 0.97), _u(rng, 0.015, 0.04))
    return out


def augment(image: Image.Image, a: CaptureAugment, rng: np.random.Generator) -> Image.Image:
    out = image
    if rng.random() < a.p_crop:
        out = capture.crop(
            out,
            _u(rng, *a.crop_scale),
            _u(rng, *a.crop_scale),
            _u(rng, 0.3, 0.7),
            _u(rng, 0.3, 0.7),
        )
    if rng.random() < a.p_flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < a.p_flip:
        out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rng.random() < a.p_rot90:
        out = out.transpose(Image.Transpose.ROTATE_90)
    if rng.random() < a.p_rotate:
        out = capture.rotate(out, _u(rng, -a.max_degrees, a.max_degrees))
    if rng.random() < a.p_colour:
        out = colour_jitter(out, a, rng)
    out = overlays(out, a, rng)
    if rng.random() < a.p_letterbox:
        width, height = _frame_shape(out, rng)
        # White bars too: some polyp frames were cropped onto white, so none may keep them.
        fill = (255, 255, 255) if rng.random() < a.p_white_bars else capture.BLACK
        out = capture.letterbox(out, width, height, _u(rng, 0, 1), _u(rng, 0, 1), fill)
    if rng.random() < a.p_blur:
        out = capture.blur(out, _u(rng, 0.3, 1.5))
    if rng.random() < a.p_lowres:
        out = capture.rescale(out, _u(rng, *a.lowres))
    if rng.random() < a.p_jpeg:
        out = capture.jpeg(out, int(rng.integers(a.jpeg_quality[0], a.jpeg_quality[1] + 1)))
    return out


@dataclass(frozen=True)
class DermoscopyAugment:
    """Dermoscopy capture changes: orientation is arbitrary (flips, any rotation), light and
    camera colour vary (white balance, colour jitter), hair, rulers and vignetting are
    artefacts of the device or the skin, not of the lesion."""

    p_crop: float = 0.5
    crop_scale: tuple[float, float] = (0.75, 1.0)
    p_rotate: float = 0.7
    p_colour: float = 0.8
    white_balance: float = 0.1
    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.02
    p_hair: float = 0.3
    p_ruler: float = 0.15
    p_vignette: float = 0.3
    p_blur: float = 0.15
    p_jpeg: float = 0.4
    jpeg_quality: tuple[int, int] = (40, 95)
    # Off by default (ham10000/2's recipe): another camera's frame shape around the image and
    # a lower-resolution sensor, for models whose preprocessing crops the bars away again.
    p_letterbox: float = 0.0
    p_lowres: float = 0.0
    lowres: tuple[float, float] = (0.4, 0.9)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        a, out = self, image
        size = out.size
        if rng.random() < a.p_crop:
            s = _u(rng, *a.crop_scale)
            out = capture.crop(out, s, s, _u(rng, 0.4, 0.6), _u(rng, 0.4, 0.6)).resize(size)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if rng.random() < a.p_rotate:
            out = capture.rotate_fill(out, _u(rng, 0, 360))
        if rng.random() < a.p_colour:
            out = colour_jitter(out, a, rng)
        if rng.random() < a.p_hair:
            curves = []
            for _ in range(int(rng.integers(1, 8))):
                x, y, angle = _u(rng, 0, 1), _u(rng, 0, 1), _u(rng, 0, np.pi)
                bend, length = _u(rng, -0.3, 0.3), _u(rng, 0.2, 0.6)
                ts = np.linspace(-0.5, 0.5, 8) * length
                curves.append(
                    [
                        (x + t * np.cos(angle + bend * t), y + t * np.sin(angle + bend * t))
                        for t in ts
                    ]
                )
            out = capture.hairs(out, curves, _u(rng, 0.003, 0.01))
        if rng.random() < a.p_ruler:
            out = capture.ruler(out, float(rng.choice([0.05, 0.95])), int(rng.integers(10, 30)))
        if rng.random() < a.p_vignette:
            out = capture.vignette(out, _u(rng, 0.2, 0.9))
        # Both new changes draw nothing when off, so ham10000/2's recipe replays as trained.
        if a.p_letterbox and rng.random() < a.p_letterbox:
            width, height = _frame_shape(out, rng)
            out = capture.letterbox(
                out, max(out.width, width), height, _u(rng, 0, 1), _u(rng, 0, 1)
            )
        if rng.random() < a.p_blur:
            out = capture.blur(out, _u(rng, 0.3, 1.2))
        if a.p_lowres and rng.random() < a.p_lowres:
            out = capture.rescale(out, _u(rng, *a.lowres))
        if rng.random() < a.p_jpeg:
            out = capture.jpeg(out, int(rng.integers(a.jpeg_quality[0], a.jpeg_quality[1] + 1)))
        return out


RECIPES = {"endoscopy": CaptureAugment, "dermoscopy": DermoscopyAugment}


def make_augment(recipe: str, params: dict | None = None) -> CaptureAugment | DermoscopyAugment:
    """The named recipe with some fields overridden (lists from YAML become tuples)."""
    cls = RECIPES[recipe]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(params or {}) - names)
    if unknown:
        raise ValueError(f"augment_params: unknown fields {unknown} for recipe {recipe!r}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in (params or {}).items()}
    return cls(**values)
