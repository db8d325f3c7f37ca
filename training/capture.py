"""Capture changes that carry no diagnosis, as deterministic functions of explicit parameters.

Training draws their parameters at random (``training/augment.py``) to teach a model what
does not matter; the audit applies fixed ones (``training/audit.py``) to measure whether it
learned it. All work on PIL RGB images of a frame as a capture card delivers it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

BLACK = (0, 0, 0)
GREEN_PANEL = (30, 150, 60)


def letterbox(
    image: Image.Image,
    width: int,
    height: int,
    fx: float = 0.5,
    fy: float = 0.5,
    fill: tuple[int, int, int] = BLACK,
) -> Image.Image:
    """``image`` fitted (aspect kept) into a ``width`` x ``height`` canvas of ``fill``;
    ``fx``/``fy`` place it (0 = left/top edge, 1 = right/bottom edge)."""
    scale = min(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (width, height), fill)
    resized = image.resize((w, h), Image.Resampling.BILINEAR)
    canvas.paste(resized, (round((width - w) * fx), round((height - h) * fy)))
    return canvas


def crop(image: Image.Image, scale_w: float, scale_h: float, cx: float, cy: float) -> Image.Image:
    """Sub-rectangle of relative size (``scale_w``, ``scale_h``) centred at (``cx``, ``cy``),
    both relative; clamped to stay inside the frame."""
    w, h = max(1, round(image.width * scale_w)), max(1, round(image.height * scale_h))
    x0 = int(np.clip(round(cx * image.width - w / 2), 0, image.width - w))
    y0 = int(np.clip(round(cy * image.height - h / 2), 0, image.height - h))
    return image.crop((x0, y0, x0 + w, y0 + h))


def rescale(image: Image.Image, factor: float) -> Image.Image:
    w, h = max(1, round(image.width * factor)), max(1, round(image.height * factor))
    return image.resize((w, h), Image.Resampling.BILINEAR)


def white_balance(image: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    """Per-channel gains, as a different light source or camera white point gives."""
    array = np.asarray(image, dtype=np.float32) * np.asarray(gains, np.float32)
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "RGB")


def colour_temperature(image: Image.Image, shift: float) -> Image.Image:
    """Warmer (``shift`` > 0) or cooler (< 0) light: red up and blue down, or the reverse."""
    return white_balance(image, (1.0 + shift, 1.0, 1.0 - shift))


def adjust(
    image: Image.Image,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
) -> Image.Image:
    out = image
    if brightness != 1.0:
        out = ImageEnhance.Brightness(out).enhance(brightness)
    if contrast != 1.0:
        out = ImageEnhance.Contrast(out).enhance(contrast)
    if saturation != 1.0:
        out = ImageEnhance.Color(out).enhance(saturation)
    if hue:
        h, s, v = out.convert("HSV").split()
        shift = round(hue * 255) % 256
        h = h.point(lambda x: (x + shift) % 256)
        out = Image.merge("HSV", (h, s, v)).convert("RGB")
    return out


def blur(image: Image.Image, radius: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Rotated about the centre onto a black canvas that holds the whole rotated frame."""
    return image.rotate(degrees, Image.Resampling.BILINEAR, expand=True, fillcolor=BLACK)


def _box_px(image: Image.Image, rect: tuple[float, float, float, float]) -> tuple[int, ...]:
    x0, y0, x1, y1 = rect
    return (
        round(x0 * image.width),
        round(y0 * image.height),
        round(x1 * image.width) - 1,
        round(y1 * image.height) - 1,
    )


def box(
    image: Image.Image, rect: tuple[float, float, float, float], colour: tuple = BLACK
) -> Image.Image:
    """A filled rectangle at relative ``rect`` (x0, y0, x1, y1): a blanked thumbnail, a panel."""
    out = image.copy()
    ImageDraw.Draw(out).rectangle(_box_px(out, rect), fill=colour)
    return out


def green_inset(image: Image.Image, rect: tuple[float, float, float, float]) -> Image.Image:
    """A scope-position inset as some processors draw it: a green panel with a white scope
    outline and a dark grid."""
    out = box(image, rect, GREEN_PANEL)
    draw = ImageDraw.Draw(out)
    x0, y0, x1, y1 = _box_px(out, rect)
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    for k in range(1, 4):
        draw.line((x0 + k * w // 4, y0, x0 + k * w // 4, y1), fill=(10, 80, 30), width=1)
        draw.line((x0, y0 + k * h // 4, x1, y0 + k * h // 4), fill=(10, 80, 30), width=1)
    points = [
        (x0 + w * t, y0 + h * (0.8 - 0.6 * t + 0.3 * np.sin(6 * t)))
        for t in np.linspace(0.1, 0.9, 12)
    ]
    draw.line(points, fill=(240, 240, 240), width=max(1, w // 30))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(6, size))
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def text(
    image: Image.Image,
    lines: list[str],
    x: float,
    y: float,
    height: float = 0.035,
    colour: tuple = (235, 235, 235),
) -> Image.Image:
    """On-screen text (patient fields, time stamps, settings) at relative (``x``, ``y``),
    each line ``height`` of the frame height tall."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    size = max(6, round(height * out.height))
    font = _font(size)
    for i, line in enumerate(lines):
        draw.text(
            (round(x * out.width), round(y * out.height) + i * (size + 2)), line, colour, font
        )
    return out


def marker(
    image: Image.Image, x: float, y: float, radius: float = 0.025, colour: tuple = (235, 235, 235)
) -> Image.Image:
    """A small ring icon (a scope or position marker) centred at relative (``x``, ``y``)."""
    out = image.copy()
    r = max(2, round(radius * out.height))
    cx, cy = round(x * out.width), round(y * out.height)
    ImageDraw.Draw(out).ellipse(
        (cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(1, r // 3)
    )
    return out


def rotate_fill(image: Image.Image, degrees: float) -> Image.Image:
    """Rotated about the centre and zoomed just enough that no corner shows background: for
    images whose content fills the frame (dermoscopy), any angle is a capture choice."""
    cos, sin = abs(np.cos(np.deg2rad(degrees))), abs(np.sin(np.deg2rad(degrees)))
    w, h = image.size
    # The largest centred w:h rectangle inside the rotated frame, less the blended edge.
    zoom = 1.02 * max((w * cos + h * sin) / w, (w * sin + h * cos) / h)  # + edge blend
    rotated = image.rotate(degrees, Image.Resampling.BILINEAR)
    return crop(rotated, 1 / zoom, 1 / zoom, 0.5, 0.5).resize((w, h), Image.Resampling.BILINEAR)


def hairs(
    image: Image.Image,
    curves: list[list[tuple[float, float]]],
    width: float = 0.006,
    colour: tuple = (40, 30, 25),
) -> Image.Image:
    """Dark hair-like strokes along relative polylines."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    px = max(1, round(width * out.width))
    for curve in curves:
        draw.line([(x * out.width, y * out.height) for x, y in curve], fill=colour, width=px)
    return out


def ruler(
    image: Image.Image, y: float, ticks: int = 20, colour: tuple = (20, 20, 20)
) -> Image.Image:
    """A measuring scale along relative height ``y``: a line with tick marks."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    yy = round(y * out.height)
    draw.line((0, yy, out.width, yy), fill=colour, width=1)
    step = out.width / ticks
    for i in range(ticks + 1):
        length = 6 if i % 5 == 0 else 3
        draw.line((i * step, yy - length, i * step, yy), fill=colour, width=1)
    return out


def vignette(image: Image.Image, strength: float) -> Image.Image:
    """Darker towards the corners, as dermatoscope optics give: 0 none, 1 black corners."""
    w, h = image.size
    ys = (np.arange(h) + 0.5) / h * 2 - 1
    xs = (np.arange(w) + 0.5) / w * 2 - 1
    r2 = (ys[:, None] ** 2 + xs[None, :] ** 2) / 2
    gain = np.clip(1 - strength * r2**1.5, 0, 1)[..., None]
    array = np.asarray(image, np.float32) * gain
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "RGB")
