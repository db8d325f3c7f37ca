"""Open Inference Protocol v2 (KServe v2 / Triton REST) over the same registry, pipeline, queue
and metrics as ``/predict``: a thin front, no second path to the engine.

Inputs of ``/v2/models/{m}/infer``:
- ``image``: BYTES ``[N]`` or ``[N, 1]`` (encoded JPEG/PNG; base64 strings in JSON form), or
  UINT8 ``[N, H, W, 3]`` RGB pixels;
- ``tabular``: FP32 ``[N, F]`` in the manifest's field order (numbers in their units,
  categories as their index in the manifest's list), with ``tabular_mask`` FP32 ``[N, F]``
  (1 = present); without them every field is missing.
Request parameters: ``timeout`` (microseconds, as tritonclient sends it), ``coverage``,
``sets`` (``class`` or ``marginal``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service import __version__
from service.api.auth import require, require_health
from service.api.oip_codec import InferRequest, Tensor, encode_response, parse_request
from service.api.parsing import request_id_from
from service.decision import SET_KINDS
from service.errors import BadRequest, InvalidRequest, NotReady, ServiceError
from service.pipeline import RawRequest, ServiceContext, predict
from service.registry import ModelVersion

router = APIRouter(prefix="/v2")
_HEADER_LENGTH = "inference-header-content-length"
PREDICT = [Depends(require("predict"))]
READ = [Depends(require("models:read"))]


def _ctx(request: Request) -> ServiceContext:
    return request.app.state.ctx


@router.get("", dependencies=READ)
async def server_metadata() -> dict[str, Any]:
    return {
        "name": "endofuse",
        "version": __version__,
        "extensions": ["binary_tensor_data", "model_configuration"],
    }


@router.get("/health/live", dependencies=[Depends(require_health)])
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", dependencies=[Depends(require_health)])
async def ready(request: Request) -> JSONResponse:
    ok, _ = _ctx(request).readiness()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", dependencies=READ)
@router.get("/models/{name}/versions/{version}", dependencies=READ)
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict:
    registry = _ctx(request).registry
    mv = registry.get(name, version)
    return {
        "name": mv.name,
        "versions": [
            v.version for v in registry.versions(mv.name) if v.key not in registry.refused
        ],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in _inputs(mv)],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in _outputs(mv)],
    }


@router.get("/models/{name}/ready", dependencies=READ)
@router.get("/models/{name}/versions/{version}/ready", dependencies=READ)
async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    ctx = _ctx(request)
    mv = ctx.registry.get(name, version)
    workers = ctx.queue.workers()
    ok = ctx.ready and ctx.queue.reachable() and (workers is None or workers.get(mv.key, 0) > 0)
    return JSONResponse({"name": mv.name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}/config", dependencies=READ)
@router.get("/models/{name}/versions/{version}/config", dependencies=READ)
async def model_config(request: Request, name: str, version: str | None = None) -> dict:
    """Triton's model configuration, which perf_analyzer reads (batch dimension implicit)."""
    ctx = _ctx(request)
    mv = ctx.registry.get(name, version)
    types = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL"}

    def entries(rows: list[tuple[str, str, list[int]]], optional: set[str]) -> list[dict]:
        return [
            {"name": n, "data_type": types[d], "dims": s[1:] or [1], "optional": n in optional}
            for n, d, s in rows
        ]

    return {
        "name": mv.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": ctx.settings.max_batch_size,
        "input": entries(_inputs(mv), {"tabular", "tabular_mask"}),
        "output": entries(_outputs(mv), set()),
    }


@router.post("/models/{name}/infer", dependencies=PREDICT)
@router.post("/models/{name}/versions/{version}/infer", dependencies=PREDICT)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    ctx = _ctx(request)
    model_label = name
    try:
        if not ctx.ready:
            raise NotReady("models are not loaded yet")
        mv = ctx.registry.get(name, version)
        model_label = mv.name
        with ctx.admit(), ctx.hold(mv):
            req = parse_request(await request.body(), _header_length(request))
            raws = to_raw_requests(req, mv, request_id_from(request))
            answers = await asyncio.gather(
                *(predict(ctx, raw, mv) for raw in raws), return_exceptions=True
            )
    except ServiceError as exc:
        ctx.metrics.requests.labels(model_label, exc.code).inc()
        raise
    for answer in answers:
        if isinstance(answer, BaseException):
            code = answer.code if isinstance(answer, ServiceError) else "internal_error"
            ctx.metrics.requests.labels(model_label, code).inc()
            raise answer
    return _respond(req, mv, answers)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(_HEADER_LENGTH)
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("Inference-Header-Content-Length must be a number")
    return int(value)


def _inputs(mv: ModelVersion) -> list[tuple[str, str, list[int]]]:
    rows = [("image", "BYTES", [-1])]
    if mv.manifest.tabular is not None:
        width = len(mv.manifest.tabular.fields)
        rows += [("tabular", "FP32", [-1, width]), ("tabular_mask", "FP32", [-1, width])]
    return rows


def _outputs(mv: ModelVersion) -> list[tuple[str, str, list[int]]]:
    rows = [("probabilities", "FP32", [-1, len(mv.manifest.labels)]), ("label", "BYTES", [-1])]
    if mv.manifest.decision is not None:
        rows += [
            ("prediction_set", "BYTES", [-1]),
            ("refer", "BOOL", [-1]),
            ("ood_score", "FP32", [-1]),
            ("ood_flagged", "BOOL", [-1]),
        ]
    return rows


def to_raw_requests(req: InferRequest, mv: ModelVersion, request_id: str) -> list[RawRequest]:
    """One pipeline request per batch row."""
    unknown = set(req.inputs) - {"image", "tabular", "tabular_mask"}
    if unknown:
        raise InvalidRequest("unknown input; accepted: image, tabular, tabular_mask")
    images = _image_rows(req.inputs.get("image"))
    tabular = _tabular_rows(req.inputs, mv)
    n = len(images) if images is not None else len(tabular or [])
    if n == 0:
        raise InvalidRequest("send an 'image' input, 'tabular' inputs, or both")
    if tabular is not None and len(tabular) != n:
        raise InvalidRequest("inputs disagree on the batch size")
    timeout_us = req.parameters.get("timeout")
    timeout_s = None
    if timeout_us is not None:
        if not isinstance(timeout_us, (int, float)) or timeout_us <= 0:
            raise InvalidRequest("parameter 'timeout' must be a positive number of microseconds")
        timeout_s = timeout_us / 1e6
    coverage = req.parameters.get("coverage")
    if coverage is not None and not isinstance(coverage, (int, float)):
        raise InvalidRequest("parameter 'coverage' must be a number")
    sets = req.parameters.get("sets")
    if sets is not None and sets not in SET_KINDS:
        raise InvalidRequest(f"parameter 'sets' must be one of {', '.join(SET_KINDS)}")
    rows = []
    for i in range(n):
        image = images[i] if images is not None else None
        rows.append(
            RawRequest(
                image=image if isinstance(image, bytes) else None,
                pixels=image if isinstance(image, np.ndarray) else None,
                tabular=tabular[i] if tabular is not None else None,
                request_id=f"{req.id or request_id}:{i}" if n > 1 else (req.id or request_id),
                coverage=float(coverage) if coverage is not None else None,
                sets=sets,
                timeout_s=timeout_s,
            )
        )
    return rows


def _image_rows(tensor: Tensor | None) -> list[Any] | None:
    if tensor is None:
        return None
    if tensor.datatype == "BYTES":
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidRequest("a BYTES 'image' input has shape [N] or [N, 1]")
        return list(tensor.data.reshape(-1))
    if tensor.datatype == "UINT8":
        if len(tensor.shape) != 4 or tensor.shape[3] != 3:
            raise InvalidRequest("a UINT8 'image' input has shape [N, height, width, 3]")
        return list(tensor.data)
    raise InvalidRequest("input 'image' must be BYTES (encoded) or UINT8 (RGB pixels)")


def _tabular_rows(inputs: dict[str, Tensor], mv: ModelVersion) -> list[dict] | None:
    values, mask = inputs.get("tabular"), inputs.get("tabular_mask")
    if values is None and mask is None:
        return None
    schema = mv.manifest.tabular
    if schema is None:
        raise InvalidRequest(f"model '{mv.name}' takes no tabular input")
    if values is None or mask is None:
        raise InvalidRequest("send 'tabular' together with 'tabular_mask'")
    width = len(schema.fields)
    for t in (values, mask):
        if t.datatype != "FP32" or len(t.shape) != 2 or t.shape[1] != width:
            raise InvalidRequest(f"'{t.name}' must be FP32 [N, {width}]")
    if values.shape != mask.shape:
        raise InvalidRequest("'tabular' and 'tabular_mask' shapes differ")
    rows = []
    for row, present in zip(values.data, mask.data, strict=True):
        fields: dict[str, Any] = {}
        for spec, value, here in zip(schema.fields, row, present, strict=True):
            if not here:
                fields[spec.name] = None
            elif spec.kind == "numeric":
                fields[spec.name] = float(value)
            else:
                index = int(value)
                if index != value or not 0 <= index < len(spec.categories):
                    raise InvalidRequest(f"'tabular' field '{spec.name}': not a category index")
                fields[spec.name] = spec.categories[index]
        rows.append(fields)
    return rows


def _respond(req: InferRequest, mv: ModelVersion, answers: list[dict]) -> Response:
    labels = mv.manifest.labels
    arrays: dict[str, tuple[str, np.ndarray]] = {
        "probabilities": (
            "FP32",
            np.array([[a["probabilities"][k] for k in labels] for a in answers], np.float32),
        ),
        "label": ("BYTES", _bytes([a["label"] for a in answers])),
    }
    if mv.manifest.decision is not None:
        arrays["prediction_set"] = ("BYTES", _bytes([json.dumps(a["prediction_set"])
                                                     for a in answers]))  # fmt: skip
        arrays["refer"] = ("BOOL", np.array([a["refer"] for a in answers], np.bool_))
        ood = [a.get("ood") or {"score": float("nan"), "flagged": False} for a in answers]
        arrays["ood_score"] = ("FP32", np.array([o["score"] for o in ood], np.float32))
        arrays["ood_flagged"] = ("BOOL", np.array([o["flagged"] for o in ood], np.bool_))
    if req.outputs:
        unknown = set(req.outputs) - set(arrays)
        if unknown:
            raise InvalidRequest("unknown output requested; see the model metadata")
        chosen = list(req.outputs)
        default_binary = bool(req.parameters.get("binary_data_output", False))
        binary = {n for n in chosen if req.outputs[n] or default_binary}
    else:
        chosen = list(arrays)
        binary = set(chosen) if req.parameters.get("binary_data_output") else set()
    header = {"model_name": mv.name, "model_version": mv.version}
    if req.id is not None:
        header["id"] = req.id
    outputs = [(n, arrays[n][0], arrays[n][1]) for n in chosen]
    body, header_length = encode_response(header, outputs, binary)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


def _bytes(texts: list[str]) -> np.ndarray:
    out = np.empty(len(texts), dtype=object)
    out[:] = [t.encode() for t in texts]
    return out
