"""Image decode + resize: the one preprocessing path shared by training and serving.

Torch-free on purpose: the serving image carries no torch, and training calls this same
function on the same bytes, so a model never sees pixels prepared differently in production.
Normalisation is not done here; it lives inside the exported ONNX graph.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import PayloadTooLarge, UndecodableImage, UnsupportedMediaType
from service.geometry import canonical_frame, find_bars
from service.png_check import check_png

# Our own pixel cap (checked from the header, before any decoding) is stricter than Pillow's.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# EXIF orientation -> Pillow transpose ops, applied in order.
_ORIENTATION_OPS: dict[int, tuple[Image.Transpose, ...]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}
_EXIF_ORIENTATION = 0x0112


# Preprocessing versions. A manifest without one was written before versions existed: 1.
#   1: squash the whole frame to the input size, then black out fixed fractional regions.
#   2: crop to the field of view, fit keeping the aspect, pad, black out beyond the inscribed
#      ellipse (service/geometry.py): the capture's frame shape and overlays carry no signal.
#   3: version 2 without the ellipse mask, for images whose content reaches the corners
#      (dermoscopy: a large lesion's border is diagnostic); bars around it still carry none.
#   4: black bars cut (letterbox, pillarbox; to the pixel), then version 1: for a model
#      trained with version 1 on frames without bars (dermoscopy), which then reads a frame
#      in bars as the frame alone, and any other frame as version 1 would (a frame of
#      another shape is squashed, not padded: padding would show it bars). Content reaching
#      the frame's edge, however dark or bright, is never cut.
PREPROCESSING_VERSIONS = (1, 2, 3, 4)


@dataclass(frozen=True)
class ImageSpec:
    """What a model expects: output size, preprocessing version, regions blanked (version 1).

    ``mask_regions`` are (x0, y0, x1, y1) fractions of the output frame set to black. They
    remove capture artefacts (on-screen overlays, marker boxes) that would otherwise let a
    model learn the recording device instead of the tissue.
    """

    height: int
    width: int
    mask_regions: tuple[tuple[float, float, float, float], ...] = field(default_factory=tuple)
    version: int = 1

    def __post_init__(self) -> None:
        if self.version not in PREPROCESSING_VERSIONS:
            raise ValueError(
                f"preprocessing version {self.version} is not one of {PREPROCESSING_VERSIONS}"
            )

    @classmethod
    def from_manifest(cls, image: dict) -> ImageSpec:
        regions = tuple(tuple(float(v) for v in r) for r in image.get("mask_regions", []))
        version = int((image.get("preprocessing") or {}).get("version", 1))
        return cls(
            height=int(image["height"]),
            width=int(image["width"]),
            mask_regions=regions,
            version=version,
        )

    def to_manifest(self) -> dict:
        if self.version in (1, 4):
            resize = "bilinear-antialiased, aspect not kept"
            steps = ["decode", "exif-orientation", "rgb", "squash-resize", "mask-regions"]
            if self.version == 4:
                resize = "black bars cut, then " + resize
                steps.insert(3, "bar-crop")
        else:
            resize = "field-of-view crop, bilinear-antialiased, aspect kept, black padding"
            steps = ["decode", "exif-orientation", "rgb", "fov-crop", "fit-pad"]
            if self.version == 2:
                steps.append("ellipse-mask")
        return {
            "height": self.height,
            "width": self.width,
            "layout": "NHWC",
            "dtype": "uint8",
            "color": "RGB",
            "resize": resize,
            "mask_regions": [list(r) for r in self.mask_regions],
            "preprocessing": {"version": self.version, "steps": steps},
        }


def sniff_format(data: bytes) -> str:
    """Return ``"jpeg"`` or ``"png"`` from the magic bytes; anything else is unsupported."""
    if not data:
        raise UndecodableImage("image is empty")
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_PNG_MAGIC):
        return "png"
    raise UnsupportedMediaType("image must be JPEG or PNG")


def decode_image(data: bytes, spec: ImageSpec, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode JPEG/PNG bytes to a uint8 RGB array of shape (spec.height, spec.width, 3)."""
    return decode_frame(data, spec, max_pixels)[0]


def decode_frame(
    data: bytes, spec: ImageSpec, max_pixels: int = 40_000_000
) -> tuple[np.ndarray, tuple[int, int]]:
    """``decode_image``, and the frame's (width, height) as displayed (EXIF orientation
    applied): the capture's geometry, which serving reports as a metric."""
    fmt = sniff_format(data)
    image = _open(data, fmt)
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image has {width * height} pixels; the limit is {max_pixels}")
    if fmt == "png":
        _check_png_budget(width, height, len(data))
        check_png(data)  # Pillow would fill damaged image data with black and carry on
    orientation = _orientation(image)
    if fmt == "jpeg":
        # Scaled DCT decode: never smaller than the target, in the frame as stored.
        swapped = orientation in (5, 6, 7, 8)
        target = (spec.height, spec.width) if swapped else (spec.width, spec.height)
        image.draft(image.mode, target)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise UndecodableImage("image data is corrupt or truncated") from exc
    for op in _ORIENTATION_OPS.get(orientation, ()):
        image = image.transpose(op)
    shown = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return prepare(to_rgb(image), spec), shown


# A PNG has no reduced-size decode: its whole pixel grid is inflated. Past a few megapixels,
# a file that expands to hundreds of times its size (a flat 6000x6000 canvas in 100 KB) costs
# the server a second of CPU and 100 MB for a cheap upload, and is no camera frame.
PNG_FREE_PIXELS = 4_000_000
PNG_MAX_EXPANSION = 200


def _check_png_budget(width: int, height: int, n_bytes: int) -> None:
    pixels = width * height
    if pixels > PNG_FREE_PIXELS and pixels * 3 > PNG_MAX_EXPANSION * n_bytes:
        raise PayloadTooLarge(
            f"PNG of {pixels} pixels expands more than {PNG_MAX_EXPANSION}x its size; "
            "send it as JPEG or at a lower resolution"
        )


def from_pixels(pixels: np.ndarray, spec: ImageSpec, max_pixels: int = 40_000_000) -> np.ndarray:
    """An already-decoded uint8 RGB frame [H, W, 3] -> the model's input, as ``decode_image``
    would give for the same frame encoded losslessly."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UnsupportedMediaType("pixel tensors must be uint8 [height, width, 3] RGB")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise UndecodableImage("pixel tensor is empty")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image has {width * height} pixels; the limit is {max_pixels}")
    return prepare(Image.fromarray(np.ascontiguousarray(pixels), "RGB"), spec)


def prepare(rgb: Image.Image, spec: ImageSpec) -> np.ndarray:
    """A decoded RGB frame -> the model's uint8 input, by the spec's preprocessing version."""
    if spec.version in (2, 3):
        return canonical_frame(rgb, spec.height, spec.width, ellipse=spec.version == 2)
    if spec.version == 4:
        box = find_bars(rgb)
        if box != (0, 0, *rgb.size):
            rgb = rgb.crop(box)
    if rgb.size != (spec.width, spec.height):
        rgb = rgb.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(rgb, dtype=np.uint8)
    if spec.mask_regions:
        array = apply_mask_regions(array, spec.mask_regions)
    return array


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any JPEG/PNG mode to 8-bit RGB; transparency is composited onto black."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):  # 16-bit (or 32-bit int) greyscale PNG: scale, don't clip.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        grey = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBa", "RGBA"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr


def apply_mask_regions(
    array: np.ndarray, regions: tuple[tuple[float, float, float, float], ...]
) -> np.ndarray:
    out = array.copy()
    height, width = out.shape[:2]
    for x0, y0, x1, y1 in regions:
        out[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = 0
    return out


def _open(data: bytes, fmt: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=["JPEG" if fmt == "jpeg" else "PNG"])
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge("image dimensions exceed the pixel limit") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UndecodableImage("image header could not be read") from exc


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block must not reject an otherwise good frame
        return 1
