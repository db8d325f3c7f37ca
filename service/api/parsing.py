"""Transport parsing: multipart or JSON body -> :class:`RawRequest`."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.errors import BadRequest, InvalidTabular, MissingInput, UnsupportedMediaType
from service.pipeline import RawRequest

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FORM_FIELDS = {"image", "tabular"}
_BOUNDARY = re.compile(r"boundary=(\"[^\"]+\"|[^;\s]+)", re.IGNORECASE)
_INVALID = object()


def request_id_from(request: Request) -> str:
    supplied = request.headers.get("x-request-id", "")
    return supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex


async def decode_request(request: Request) -> RawRequest:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        raw = await _from_multipart(request)
    elif content_type == "application/json":
        raw = _from_json(await request.body())
    else:
        raise UnsupportedMediaType(
            "send multipart/form-data (image file + optional tabular JSON field) "
            'or application/json ({"image": base64, "tabular": {...}})'
        )
    return raw


async def _from_multipart(request: Request) -> RawRequest:
    # The body is already capped by the size limit; reading it first lets a truncated body
    # (no closing delimiter) be refused instead of parsed as if parts were simply absent.
    body = await request.body()
    boundary = _boundary(request.headers.get("content-type", ""))
    if boundary is None or b"--" + boundary + b"--" not in body:
        raise BadRequest("malformed multipart body: missing boundary or closing delimiter")
    try:
        # Two files at most: the image and, optionally, the tabular JSON sent as a file part.
        form = await request.form(max_files=2, max_fields=4)
    except Exception as exc:  # malformed boundaries, too many parts
        raise BadRequest("malformed multipart body") from exc
    try:
        for key in form:
            if key not in _FORM_FIELDS:
                raise BadRequest("unexpected form field; accepted: image, tabular")
        image = form.get("image")
        image_bytes: bytes | None
        if image is None:
            # One documented shape per media type: tabular-only requests are JSON.
            raise MissingInput("multipart requests carry an 'image' file part; "
                               "send tabular fields alone as a JSON body")  # fmt: skip
        if isinstance(image, UploadFile):
            image_bytes = await image.read()
        else:
            raise BadRequest("form field 'image' must be a file upload")
        tabular_text = form.get("tabular")
        if isinstance(tabular_text, UploadFile):
            tabular_text = (await tabular_text.read()).decode("utf-8", errors="replace")
        tabular = None if tabular_text is None else _parse_tabular_json(tabular_text)
    finally:
        await form.close()
    return RawRequest(image=image_bytes, tabular=tabular)


def _boundary(content_type: str) -> bytes | None:
    match = _BOUNDARY.search(content_type)
    return match.group(1).strip('"').encode("latin-1") if match else None


def load_json(text: bytes | str) -> Any:
    """``json.loads`` whose every failure is the client's: invalid JSON, nesting deeper than
    the parser's recursion limit, integers longer than Python converts."""
    try:
        return json.loads(text, parse_int=_bounded_int)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        return _INVALID


def _bounded_int(digits: str) -> float | int:
    # No clinical field needs more than a few digits; a longer integer becomes infinity,
    # which field validation refuses by name (422), instead of costing a bignum conversion.
    return int(digits) if len(digits) <= 32 else math.inf


def _from_json(body: bytes) -> RawRequest:
    payload = load_json(body)
    if payload is _INVALID:
        raise BadRequest("body is not valid JSON (or is nested or sized beyond the limits)")
    if not isinstance(payload, dict):
        raise BadRequest("JSON body must be an object with 'image' and/or 'tabular'")
    if set(payload) - _FORM_FIELDS:
        raise BadRequest("unexpected JSON key; accepted: image, tabular")
    image_b64 = payload.get("image")
    image: bytes | None = None
    if image_b64 is not None:
        if not isinstance(image_b64, str):
            raise BadRequest("'image' must be a base64 string")
        try:
            image = base64.b64decode(image_b64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("'image' is not valid base64") from None
    return RawRequest(image=image, tabular=payload.get("tabular"))


def _parse_tabular_json(text: str) -> Any:
    # A part that is sent must hold an object: empty or ``null`` is refused, not read as absent.
    value = load_json(text)
    if value is _INVALID or not isinstance(value, dict):
        raise InvalidTabular("form field 'tabular' must be a JSON object")
    return value
