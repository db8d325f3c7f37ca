"""Transport parsing: multipart or JSON body -> :class:`RawRequest`."""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.errors import BadRequest, InvalidTabular, UnsupportedMediaType
from service.pipeline import RawRequest

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FORM_FIELDS = {"image", "tabular"}


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
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as exc:  # malformed boundaries, too many parts
        raise BadRequest("malformed multipart body") from exc
    try:
        for key in form:
            if key not in _FORM_FIELDS:
                raise BadRequest(f"unexpected form field '{key[:64]}'; accepted: image, tabular")
        image = form.get("image")
        image_bytes: bytes | None
        if image is None:
            image_bytes = None
        elif isinstance(image, UploadFile):
            image_bytes = await image.read()
        else:
            raise BadRequest("form field 'image' must be a file upload")
        tabular_text = form.get("tabular")
        if isinstance(tabular_text, UploadFile):
            tabular_text = (await tabular_text.read()).decode("utf-8", errors="replace")
        tabular = _parse_tabular_json(tabular_text) if tabular_text else None
    finally:
        await form.close()
    return RawRequest(image=image_bytes, tabular=tabular)


def _from_json(body: bytes) -> RawRequest:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("JSON body must be an object with 'image' and/or 'tabular'")
    unknown = set(payload) - _FORM_FIELDS
    if unknown:
        raise BadRequest(
            f"unexpected JSON key '{sorted(unknown)[0][:64]}'; accepted: image, tabular"
        )
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
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise InvalidTabular("form field 'tabular' must be a JSON object") from None
