"""Synthetic image bytes of every awkward kind a client may send."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def pattern(width: int = 96, height: int = 64) -> np.ndarray:
    """A frame with distinct quadrants, so any flip or rotation is visible."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [
            (x * 255 // max(width - 1, 1)),
            (y * 255 // max(height - 1, 1)),
            np.where((x < width // 2) ^ (y < height // 2), 220, 30),
        ],
        axis=-1,
    )
    return rgb.astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def jpeg(array: np.ndarray, quality: int = 95, **params: object) -> bytes:
    return encode(Image.fromarray(array), "JPEG", quality=quality, **params)


def png(array: np.ndarray, **params: object) -> bytes:
    return encode(Image.fromarray(array), "PNG", **params)


def with_orientation(array: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.fromarray(array)
    if fmt == "JPEG":
        return encode(image, fmt, exif=exif.tobytes(), quality=95)
    return encode(image, fmt, exif=exif.tobytes())


def png_bomb(side: int = 20000) -> bytes:
    """A valid greyscale PNG of side x side zero pixels that compresses to well under 1 MB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    row = b"\x00" * (side + 1)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


HTML = b"<!DOCTYPE html><html><body>not an image</body></html>"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
