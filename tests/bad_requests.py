"""How a case of the bad-input corpus (tests/bad_inputs.py) is sent: the case record and the
request shapes (multipart, JSON, raw bytes, with tabular fields) it is built from."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.bad_images import JPEG

MODELS = ("hyperkvasir-lgi", "ham10000")


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    # (method, path suffix or absolute path, keyword arguments for the HTTP client)
    request: Callable[[str], tuple[str, str, dict[str, Any]]]
    status: int
    code: str | None  # None for 200
    models: tuple[str, ...] = MODELS  # which models the case runs against
    undecodable: bool = False  # the data could not be decoded: a 200 would be a wrong answer


def multipart(image: bytes, ctype: str = "image/jpeg") -> Callable[[str], tuple]:
    return lambda path: ("POST", path, {"files": {"image": ("f", image, ctype)}})


def json_image(image: bytes) -> Callable[[str], tuple]:
    return lambda path: ("POST", path, {"json": {"image": base64.b64encode(image).decode()}})


def raw(body: bytes, ctype: str | None, method: str = "POST") -> Callable[[str], tuple]:
    headers = {"content-type": ctype} if ctype else {}
    return lambda path: (method, path, {"content": body, "headers": headers})


def with_tabular(tabular: Any, as_json_body: bool = False) -> Callable[[str], tuple]:
    if as_json_body:
        # Serialised here: NaN and Infinity are sent as the literals a lax client writes.
        body = json.dumps({"image": base64.b64encode(JPEG).decode(), "tabular": tabular})
        return raw(body.encode(), "application/json")
    text = tabular if isinstance(tabular, str) else json.dumps(tabular)
    files = {"image": ("f.jpg", JPEG, "image/jpeg")}
    return lambda path: ("POST", path, {"files": files, "data": {"tabular": text}})


def tabular_only(tabular: Any) -> Callable[[str], tuple]:
    return lambda path: ("POST", path, {"json": {"tabular": tabular}})
