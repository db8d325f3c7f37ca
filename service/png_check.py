"""Strict PNG integrity check, before any pixel is decoded.

Pillow decodes a PNG whose image data is damaged or not zlib at all without complaint,
filling what it could not read with black. A diagnosis made on such pixels is worse than
none, so every chunk's CRC is checked and the image data stream is inflated (output
discarded, memory bounded) to its end: it must be a complete zlib stream of exactly the size
the header announces.
"""

from __future__ import annotations

import struct
import zlib

from service.errors import UndecodableImage

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Samples per pixel by PNG colour type.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (x start, y start, x step, y step).
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_INFLATE_STEP = 1 << 20


def _expected_size(width: int, height: int, depth: int, colour: int, interlace: int) -> int:
    bits = _CHANNELS[colour] * depth

    def scanlines(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if not interlace:
        return scanlines(width, height)
    return sum(
        scanlines(max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy))
        for x0, y0, dx, dy in _ADAM7
    )


def check_png(data: bytes) -> None:
    """Raise UndecodableImage unless ``data`` is a structurally sound PNG."""
    if not data.startswith(_SIGNATURE):
        raise UndecodableImage("image is not a PNG")
    pos, header, inflater, produced, ended = len(_SIGNATURE), None, zlib.decompressobj(), 0, False
    while True:
        if pos + 12 > len(data):
            raise UndecodableImage("image data is corrupt or truncated")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise UndecodableImage("image data is corrupt or truncated")
        body = data[pos + 8 : end]
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(kind + body) != crc:
            raise UndecodableImage("image data is corrupt (checksum mismatch)")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13]) if length >= 13 else None
        elif kind == b"IDAT":
            if ended:
                raise UndecodableImage("image data is corrupt (data after its end)")
            try:
                chunk = inflater.decompress(body, _INFLATE_STEP)
                produced += len(chunk)
                while inflater.unconsumed_tail:
                    chunk = inflater.decompress(inflater.unconsumed_tail, _INFLATE_STEP)
                    produced += len(chunk)
            except zlib.error as exc:
                raise UndecodableImage("image data is corrupt (bad compressed stream)") from exc
            ended = inflater.eof
        elif kind == b"IEND":
            break
        pos = end + 4
    if header is None or header[3] not in _CHANNELS:
        raise UndecodableImage("image header is invalid")
    width, height, depth, colour, _, _, interlace = header
    if not ended or produced != _expected_size(width, height, depth, colour, interlace):
        raise UndecodableImage("image data is corrupt or truncated")
