"""Schemathesis hooks: real JPEG/PNG frames where the OpenAPI document says image bytes.

JSON Schema cannot say "a decodable image", so without these every generated image would be
random bytes and no fuzzed request would reach the model.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    width = draw(st.integers(8, 96))
    height = draw(st.integers(8, 96))
    seed = draw(st.integers(0, 2**16))
    fmt = draw(st.sampled_from(["JPEG", "PNG"]))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


schemathesis.openapi.format("byte", _frames().map(lambda b: base64.b64encode(b).decode()))
schemathesis.openapi.format("binary", _frames())


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Drop multipart bodies whose optional ``tabular`` is an empty array: multipart encodes an
    array as one part per item, so it goes out as no ``tabular`` part at all, the same request
    as one that leaves the optional part out (which the service rightly accepts)."""
    body = case.body
    return not (
        (case.media_type or "").startswith("multipart/")
        and isinstance(body, dict)
        and body.get("tabular") == []
    )
