"""Image bytes for the bad-input corpus (tests/bad_inputs.py): what each file is, and for the
ones that must be refused, the status and error code."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests import images

FRAME_ARRAY = np.random.default_rng(7).integers(40, 200, (120, 160, 3), dtype=np.uint8)
JPEG = images.jpeg(FRAME_ARRAY)
PNG = images.png(FRAME_ARRAY)

RGB = Image.fromarray(FRAME_ARRAY)
IMAGES_BAD: list[tuple[str, bytes, int, str]] = [
    ("empty file", b"", 400, "undecodable_image"),
    ("random bytes", np.random.default_rng(1).bytes(2048), 415, "unsupported_media_type"),
    ("HTML page", images.HTML, 415, "unsupported_media_type"),
    ("JSON text as image", b'{"image": 1}', 415, "unsupported_media_type"),
    ("GIF", images.encode(RGB, "GIF"), 415, "unsupported_media_type"),
    ("BMP", images.encode(RGB, "BMP"), 415, "unsupported_media_type"),
    ("TIFF", images.encode(RGB, "TIFF"), 415, "unsupported_media_type"),
    ("WebP", images.encode(RGB, "WEBP"), 415, "unsupported_media_type"),
    ("PDF header", b"%PDF-1.4\n%" + bytes(200), 415, "unsupported_media_type"),
    ("JPEG magic only", JPEG[:3], 400, "undecodable_image"),
    ("JPEG header only", JPEG[:200], 400, "undecodable_image"),
    ("JPEG cut in half", JPEG[: len(JPEG) // 2], 400, "undecodable_image"),
    ("JPEG cut before the end marker", JPEG[:-40], 400, "undecodable_image"),
    ("JPEG scan replaced by zeros", JPEG[:600] + bytes(len(JPEG) - 600), 400, "undecodable_image"),
    ("PNG signature only", PNG[:8], 400, "undecodable_image"),
    ("PNG cut in half", PNG[: len(PNG) // 2], 400, "undecodable_image"),
    ("PNG without IEND", PNG[:-12], 400, "undecodable_image"),
    ("PNG with a bad CRC", images.png_with_bad_crc(PNG), 400, "undecodable_image"),
    (
        "PNG whose IDAT is not zlib",
        images.png_with_idat(PNG, lambda d: b"\x00" * len(d)),
        400,
        "undecodable_image",
    ),
    (
        "PNG whose zlib stream is cut",
        images.png_with_idat(PNG, lambda d: d[: len(d) // 2]),
        400,
        "undecodable_image",
    ),
    (
        "PNG claiming 60000x60000 pixels",
        images.png_with_size(PNG, 60000, 60000),
        413,
        "payload_too_large",
    ),
    (
        "JPEG claiming 60000x60000 pixels",
        images.jpeg_with_size(JPEG, 60000, 60000),
        413,
        "payload_too_large",
    ),
    ("PNG pixel bomb 20000x20000", images.png_bomb(20000), 413, "payload_too_large"),
    (
        "flat 6000x6000 PNG (decode budget)",
        images.encode(Image.new("RGB", (6000, 6000)), "PNG"),
        413,
        "payload_too_large",
    ),
]
IMAGES_ODD_BUT_VALID: list[tuple[str, bytes]] = [
    ("1x1 JPEG", images.jpeg(np.full((1, 1, 3), 128, np.uint8))),
    ("greyscale JPEG", images.encode(RGB.convert("L"), "JPEG")),
    ("CMYK JPEG", images.encode(RGB.convert("CMYK"), "JPEG")),
    ("progressive JPEG", images.encode(RGB, "JPEG", progressive=True)),
    ("JPEG rotated by EXIF", images.with_orientation(FRAME_ARRAY, 6, "JPEG")),
    ("RGBA PNG", images.encode(RGB.convert("RGBA"), "PNG")),
    ("palette PNG", images.encode(RGB.convert("P"), "PNG")),
    (
        "16-bit greyscale PNG",
        images.encode(Image.fromarray(FRAME_ARRAY[..., 0].astype(np.uint16) * 257), "PNG"),
    ),
    ("1-bit PNG", images.encode(RGB.convert("1"), "PNG")),
    ("interlaced PNG", images.png(FRAME_ARRAY, optimize=False)),
    ("JPEG with trailing bytes", JPEG + b"trailing"),
    ("very wide 4000x8 JPEG", images.jpeg(np.full((8, 4000, 3), 90, np.uint8))),
]
