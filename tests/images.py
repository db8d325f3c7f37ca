"""Synthetic image bytes of every awkward kind a client may send."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and a valid CRC."""
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, data) of each chunk of a PNG file."""
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(k, d) for k, d in chunks)


def png_with_idat(data: bytes, transform: Callable[[bytes], bytes]) -> bytes:
    """``data`` with each IDAT chunk's image data transformed, every CRC valid again."""
    return png_from_chunks([(k, transform(d) if k == b"IDAT" else d) for k, d in png_chunks(data)])


def png_with_bad_crc(data: bytes) -> bytes:
    out = bytearray(data)
    out[data.index(b"IDAT") + 20] ^= 0xFF  # a data byte; the stored CRC no longer matches
    return bytes(out)


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` whose header claims another size (the image data is unchanged)."""
    chunks = png_chunks(data)
    ihdr = struct.pack(">II", width, height) + chunks[0][1][8:]
    return png_from_chunks([(b"IHDR", ihdr), *chunks[1:]])


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a baseline JPEG) whose frame header claims another size."""
    out = bytearray(data)
    sof = data.index(b"\xff\xc0")
    out[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def png_bomb(side: int = 20000) -> bytes:
    """A valid greyscale PNG of side x side zero pixels that compresses to well under 1 MB."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    row = b"\x00" * (side + 1)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


HTML = b"<!DOCTYPE html><html><body>not an image</body></html>"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
