"""Open Inference Protocol v2 tensors on the wire: the JSON form and the binary tensor data
extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then each tensor's raw
bytes in order, sized by its ``binary_data_size`` parameter).

Only what the wire says is checked here (types, shapes, sizes); what the tensors mean for a
model is the routes' business.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.api.parsing import load_json
from service.errors import BadRequest

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": object,
}  # fmt: skip
MAX_ELEMENTS = 64 * 1024 * 1024  # a bound on what a shape may claim before any allocation


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # object array of ``bytes`` for BYTES


@dataclass
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, Tensor]
    # Output name -> wants binary; empty: every output, binary iff ``binary_data_output``.
    outputs: dict[str, bool]


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadRequest("Inference-Header-Content-Length is outside the body")
    head = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(head) :]
    payload = load_json(head)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise BadRequest("inference request must be a JSON object with an 'inputs' list")
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for raw in payload["inputs"]:
        tensor, used = _input(raw, binary[offset:])
        if tensor.name in inputs:
            raise BadRequest("an input name appears twice")
        inputs[tensor.name] = tensor
        offset += used
    if offset != len(binary):
        raise BadRequest("binary tensor data does not match the sizes the inputs declare")
    outputs = {}
    for raw in payload.get("outputs") or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise BadRequest("each requested output needs a 'name'")
        wanted = (raw.get("parameters") or {}).get("binary_data", False)
        outputs[raw["name"]] = bool(wanted)
    request_id = payload.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        parameters=params,
        inputs=inputs,
        outputs=outputs,
    )


def _input(raw: Any, binary: memoryview) -> tuple[Tensor, int]:
    if not isinstance(raw, dict):
        raise BadRequest("each input must be an object")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or datatype not in DTYPES:
        raise BadRequest("each input needs a 'name' and a known 'datatype'")
    valid_shape = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if not valid_shape or math.prod(shape) > MAX_ELEMENTS:
        raise BadRequest(f"input '{name}': 'shape' must be a list of sizes within the limit")
    count = math.prod(shape)
    size = (raw.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or not 0 <= size <= len(binary):
            raise BadRequest(f"input '{name}': binary_data_size is outside the body")
        data = _from_binary(bytes(binary[:size]), datatype, count, name)
        return Tensor(name, datatype, shape, data.reshape(shape)), size
    if "data" not in raw:
        raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
    data = _from_json(raw["data"], datatype, count, name)
    return Tensor(name, datatype, shape, data.reshape(shape)), 0


def _from_binary(data: bytes, datatype: str, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(data):
            if pos + 4 > len(data):
                raise BadRequest(f"input '{name}': truncated BYTES element")
            (length,) = struct.unpack_from("<I", data, pos)
            items.append(data[pos + 4 : pos + 4 + length])
            pos += 4 + length
            if pos > len(data):
                raise BadRequest(f"input '{name}': truncated BYTES element")
        out = np.empty(len(items), dtype=object)
        out[:] = items
    else:
        dtype = np.dtype(DTYPES[datatype])
        if len(data) != count * dtype.itemsize:
            raise BadRequest(f"input '{name}': binary size does not match its shape")
        out = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)
    if out.size != count:
        raise BadRequest(f"input '{name}': element count does not match its shape")
    return out


def _from_json(data: Any, datatype: str, count: int, name: str) -> np.ndarray:
    flat = _flatten(data)
    if len(flat) != count:
        raise BadRequest(f"input '{name}': element count does not match its shape")
    if datatype == "BYTES":
        # JSON carries text; encoded images travel as base64 strings.
        if not all(isinstance(v, str) for v in flat):
            raise BadRequest(f"input '{name}': BYTES elements must be strings")
        out = np.empty(count, dtype=object)
        out[:] = [_b64(v, name) for v in flat]
        return out
    if not all(isinstance(v, (int, float)) and not isinstance(v, str) for v in flat):
        raise BadRequest(f"input '{name}': elements must be numbers")
    try:
        return np.asarray(flat, dtype=DTYPES[datatype])
    except (OverflowError, ValueError):
        raise BadRequest(f"input '{name}': a value does not fit {datatype}") from None


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"input '{name}': BYTES elements in JSON must be base64") from None


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested list cannot exhaust the call stack
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def encode_response(
    header: dict[str, Any], outputs: list[tuple[str, str, np.ndarray]], binary: set[str]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensor data follows."""
    tensors, blobs = [], []
    for name, datatype, array in outputs:
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in binary:
            blob = _to_binary(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            tensor["data"] = [v.decode() for v in array.reshape(-1)]
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    head = json.dumps({**header, "outputs": tensors}).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()
