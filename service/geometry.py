"""Capture-independent frame geometry (preprocessing version 2), torch-free.

Endoscopy frames arrive from many capture set-ups: the scope's field of view (FOV) sits in a
black frame whose size and aspect ratio depend on the capture card, with text, icons and
inset boxes drawn on the border. Squashing such a frame to a square lets a model read the
set-up instead of the tissue. Here every frame is brought to one canonical geometry:

1. find the FOV as the large region of pixels above the frame's own black level and below
   flat white (thin text and small icons are removed first by a morphological opening, so
   they never widen it);
2. crop to it, resize keeping its aspect ratio, and pad to the model's input with black;
3. black out everything outside the ellipse inscribed in the resized FOV, so the FOV's own
   outline (octagon, circle, rounded rectangle) and anything in its corners look the same for
   every scope.

Version 3 stops after step 2: for images whose content fills the corners (dermoscopy), where
the ellipse would black out tissue rather than a scope's outline.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

# Analysis runs on a thumbnail: a FOV is found as well at this size, at a fraction of the cost.
_THUMB_LONG_SIDE = 160
# Border black is measured per frame (capture cards deliver 0 or video-range 16); a pixel is
# content when its max channel is this far above it. Dark lumen sits ~10 above pure black.
_BLACK_MARGIN = 6
_MAX_BLACK_LEVEL = 40
# Min-channel value above which a pixel is flat white padding (some crops are padded white).
_WHITE = 245
# Opening radius as a share of the thumbnail's long side: removes text strokes and icons.
_OPEN_FRACTION = 0.025
# A row or column belongs to the FOV when its content is at least this share of the fullest.
_PROFILE_FRACTION = 0.3
# A row or column of a letterbox bar: at most this share of its pixels above border black
# (JPEG ringing and a thin overlay line in a bar stay under it; tissue never does).
_BAR_FRACTION = 0.02
# A FOV smaller than this share of the frame in either direction is not trusted.
_MIN_FOV_FRACTION = 0.2
# Below this size (pixels, shorter side) a frame is taken whole.
_MIN_ANALYSIS_SIDE = 32


def _window_count(mask: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Number of set pixels in the 2r+1 window along ``axis`` around each pixel (zero
    outside), same shape as ``mask``."""
    k = 2 * radius + 1
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius + 1, radius)
    sums = np.pad(mask, pad).cumsum(axis=axis, dtype=np.int32)
    if axis == 0:
        return sums[k:] - sums[:-k]
    return sums[:, k:] - sums[:, :-k]


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological opening with a square of side 2r+1: erosion then dilation, pixels
    outside the frame unset. A square is a row segment times a column segment, so each step
    is a row pass then a column pass (1-D running sums)."""
    if radius < 1:
        return mask
    k = 2 * radius + 1
    eroded = _window_count(_window_count(mask, radius, 1) == k, radius, 0) == k
    return _window_count(_window_count(eroded, radius, 1) > 0, radius, 0) > 0


def _longest_run(flags: np.ndarray) -> tuple[int, int] | None:
    """[start, stop) of the longest run of True values, or None."""
    best, start = None, None
    for i, flag in enumerate([*flags.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def black_level(hi: np.ndarray) -> float:
    """The border's black: the darkest corner's median (a frame's corners are outside the
    field of view whenever it has a border at all)."""
    h, w = hi.shape
    ch, cw = max(1, h // 10), max(1, w // 10)
    corners = (hi[:ch, :cw], hi[:ch, -cw:], hi[-ch:, :cw], hi[-ch:, -cw:])
    return min(min(float(np.median(c)) for c in corners), _MAX_BLACK_LEVEL)


def content_mask(thumb: np.ndarray) -> np.ndarray:
    """Pixels that may be tissue: neither border black nor flat white padding."""
    r, g, b = thumb[..., 0], thumb[..., 1], thumb[..., 2]
    # Element-wise over the channel planes: several times faster than a reduction over a
    # 3-wide last axis, and this runs on every request.
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    return (hi > black_level(hi) + _BLACK_MARGIN) & (lo < _WHITE)


def _spans(mask: np.ndarray) -> np.ndarray:
    """Per row, from the first to the last set pixel (0 for an empty row): dark patches
    inside the field of view (lumen, shadow) do not shorten it."""
    any_set = mask.any(axis=1)
    first = mask.argmax(axis=1)
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    return np.where(any_set, last - first + 1, 0)


def _thumbnail(image: Image.Image) -> tuple[np.ndarray, float, float]:
    """The frame analysed small: (RGB thumbnail, frame pixels per thumbnail pixel in x and
    in y)."""
    width, height = image.size
    scale = min(1.0, _THUMB_LONG_SIDE / max(width, height))
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    thumb = np.asarray(image.resize((tw, th), Image.Resampling.BOX), dtype=np.uint8)
    return thumb, width / tw, height / th


def _frame_box(
    cols: tuple[int, int], rows: tuple[int, int], scale: tuple[float, float], size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """Thumbnail [start, stop) runs of columns and rows -> (left, top, right, bottom) in
    the frame, one thumbnail pixel wider each side (the box filter's edge is at most that
    far off); None when smaller than ``_MIN_FOV_FRACTION`` of the frame either way."""
    (sx, sy), (width, height) = scale, size
    left = max(0, int((cols[0] - 1) * sx))
    right = min(width, int(np.ceil((cols[1] + 1) * sx)))
    top = max(0, int((rows[0] - 1) * sy))
    bottom = min(height, int(np.ceil((rows[1] + 1) * sy)))
    if right - left < _MIN_FOV_FRACTION * width or bottom - top < _MIN_FOV_FRACTION * height:
        return None
    return left, top, right, bottom


def find_fov(image: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the field of view in ``image`` pixels.

    The whole frame when no clear FOV is found: a frame without a black border, a tiny image,
    an almost black frame.
    """
    width, height = image.size
    whole = (0, 0, width, height)
    if min(width, height) < _MIN_ANALYSIS_SIDE:
        return whole
    thumb, sx, sy = _thumbnail(image)
    radius = max(1, round(_OPEN_FRACTION * max(thumb.shape[:2])))
    mask = _open(content_mask(thumb), radius)
    rows = _spans(mask)
    if rows.max(initial=0) == 0:
        return whole
    row_run = _longest_run(rows >= _PROFILE_FRACTION * rows.max())
    if row_run is None:
        return whole
    cols = _spans(mask[row_run[0] : row_run[1]].T)
    col_run = _longest_run(cols >= _PROFILE_FRACTION * cols.max())
    if col_run is None:
        return whole
    return _frame_box(col_run, row_run, (sx, sy), (width, height)) or whole


def _leading_bar(share: np.ndarray) -> int:
    """How many leading rows or columns are bar: those before the first with more than
    ``_BAR_FRACTION`` of its pixels above border black (none such: 0, nothing is cut)."""
    hits = np.flatnonzero(share > _BAR_FRACTION)
    return int(hits[0]) if len(hits) else 0


def find_bars(image: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``image`` inside its black bars (preprocessing version 4).

    A bar is a run of whole rows or columns at the frame's edge that are (almost) all border
    black. Unlike ``find_fov``, content is not judged by its extent or brightness: a dark
    lesion or bright skin reaching a frame's edge is never cut, only bars are. Bars are found
    on the thumbnail, then each edge is set at full resolution within two thumbnail pixels,
    so no sliver of a bar is left (at 1920 x 1080 a thumbnail pixel is 12 frame pixels, and
    a sliver is 1-2 black input columns to a model that never saw bars)."""
    width, height = image.size
    whole = (0, 0, width, height)
    if min(width, height) < _MIN_ANALYSIS_SIDE:
        return whole
    thumb, sx, sy = _thumbnail(image)
    hi = np.maximum(np.maximum(thumb[..., 0], thumb[..., 1]), thumb[..., 2])
    level = black_level(hi)
    lit = hi > level + _BLACK_MARGIN
    cols, rows = lit.mean(axis=0), lit.mean(axis=1)
    if cols.max(initial=0) <= _BAR_FRACTION:  # an (almost) black frame: nothing to keep
        return whole
    th, tw = lit.shape
    box = _frame_box(
        (_leading_bar(cols), tw - _leading_bar(cols[::-1])),
        (_leading_bar(rows), th - _leading_bar(rows[::-1])),
        (sx, sy),
        (width, height),
    )
    if box is None:
        return whole
    left, top, right, bottom = box
    reach_x, reach_y = int(np.ceil(2 * sx)) + 1, int(np.ceil(2 * sy)) + 1

    def lit_share(region: tuple[int, int, int, int], axis: int) -> np.ndarray:
        strip = np.asarray(image.crop(region), dtype=np.uint8)
        peak = np.maximum(np.maximum(strip[..., 0], strip[..., 1]), strip[..., 2])
        return (peak > level + _BLACK_MARGIN).mean(axis=axis)

    left += _leading_bar(lit_share((left, top, min(right, left + reach_x), bottom), 0))
    right -= _leading_bar(lit_share((max(left, right - reach_x), top, right, bottom), 0)[::-1])
    top += _leading_bar(lit_share((left, top, right, min(bottom, top + reach_y)), 1))
    bottom -= _leading_bar(lit_share((left, max(top, bottom - reach_y), right, bottom), 1)[::-1])
    return left, top, max(right, left + 1), max(bottom, top + 1)


def fit_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """Where a ``src`` region lands when resized into ``dst`` keeping its aspect, centred."""
    scale = min(dst_w / src_w, dst_h / src_h)
    w = max(1, min(dst_w, round(src_w * scale)))
    h = max(1, min(dst_h, round(src_h * scale)))
    x0, y0 = (dst_w - w) // 2, (dst_h - h) // 2
    return x0, y0, x0 + w, y0 + h


def ellipse_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean [height, width]: inside the ellipse inscribed in ``box``."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    ys = (np.arange(height) + 0.5 - cy) / ry
    xs = (np.arange(width) + 0.5 - cx) / rx
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= 1.0


# A site's capture cards give a handful of boxes; a miss costs 0.15 ms. Bounded low because
# each entry is a whole frame (150 KB at 224 x 224) and there are ~450 possible boxes per size.
@functools.lru_cache(maxsize=64)
def _keep(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 [height, width * 3]: 255 inside the ellipse, 0 outside, one byte per channel.
    Frames from one capture card share a box, so it is built once; a bitwise AND with the
    flat frame then costs microseconds where a boolean-indexed assignment cost a tenth of the
    preprocessing. Read-only, so no caller can alter the shared copy."""
    inside = ellipse_mask(height, width, box)
    keep = np.repeat(np.where(inside, np.uint8(255), np.uint8(0)), 3, axis=1)
    keep.flags.writeable = False
    return keep


def canonical_frame(
    image: Image.Image, height: int, width: int, ellipse: bool = True
) -> np.ndarray:
    """RGB ``image`` -> uint8 [height, width, 3]: FOV crop, aspect-keeping fit, and (with
    ``ellipse``) the mask outside the inscribed ellipse."""
    left, top, right, bottom = find_fov(image)
    crop = image.crop((left, top, right, bottom))
    box = fit_box(crop.width, crop.height, width, height)
    resized = crop.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR)
    out = np.zeros((height, width, 3), np.uint8)
    out[box[1] : box[3], box[0] : box[2]] = np.asarray(resized, dtype=np.uint8)
    if not ellipse:
        return out
    flat = out.reshape(height, width * 3)
    np.bitwise_and(flat, _keep(height, width, box), out=flat)
    return out
