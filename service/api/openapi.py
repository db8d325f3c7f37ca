"""The OpenAPI document, built from the loaded models so that it says exactly what each
predict operation accepts: its tabular fields and their ranges, whether the image may be left
out, which coverage levels exist, and every status the service can answer with.

The predict routes are templated in the router (``/models/{name}/predict``) but their inputs
differ per model, so the document lists one concrete path per loaded model and version.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.schemas import ERROR, INFER_REQUEST, PREDICTION, PROTOCOL_ERROR
from service.decision import SET_KINDS
from service.registry import ModelVersion, Registry
from service.tabular import FieldSpec

_REASONS = {
    400: "Malformed request or an image that could not be decoded",
    404: "No such model or version",
    405: "Method not allowed (the Allow header names the allowed ones)",
    408: "Request head or body not received in time",
    413: "Request body or image too large",
    415: "Unsupported content type or image format",
    422: "Invalid input: tabular values, parameters, or a missing modality",
    431: "Request head too large or too many header fields",
    500: "Internal error",
    503: "Overloaded, not ready, the queue is unreachable (see Retry-After), or the version "
    "is not served (model_unavailable: its self-check refused it)",
    504: "Not answered within the request deadline",
}
_EVERY_REQUEST = (408, 431)
_PREDICT_ERRORS = (400, 404, 405, 413, 415, 422, 500, 503, 504, *_EVERY_REQUEST)
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}


def install_openapi(app: FastAPI) -> None:
    """Serve the model-aware document (built once, after the models have loaded)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, app.state.ctx.registry)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_openapi(app: FastAPI, registry: Registry) -> dict[str, Any]:
    spec = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    spec["components"] = {
        "schemas": {"Error": ERROR, "Prediction": PREDICTION, "ProtocolError": PROTOCOL_ERROR}
    }
    paths: dict[str, Any] = {}
    for path, operations in spec["paths"].items():
        if path.endswith("/predict"):
            continue
        if path == "/v2" or path.startswith("/v2/"):
            paths[path] = {m: _protocol_operation(path, m, op) for m, op in operations.items()}
            continue
        paths[path] = {m: _plain_operation(path, op) for m, op in operations.items()}
    default = registry.newest(registry.default_model) if registry.default_model else None
    if default is not None:
        for path in ("/predict", "/v1/predict"):
            paths[path] = {"post": predict_operation(default, path)}
    for name in registry.names():
        if (newest := registry.newest(name)) is not None:
            path = f"/models/{name}/predict"
            paths[path] = {"post": predict_operation(newest, path)}
        for mv in registry.versions(name):
            path = f"/models/{name}/versions/{mv.version}/predict"
            paths[path] = {"post": predict_operation(mv, path)}
    spec["paths"] = paths
    if getattr(app.state, "access", None) is not None:
        settings = app.state.ctx.settings
        open_paths = (set() if settings.auth_health else _PROBES) | (
            set() if settings.auth_metrics else {"/metrics"}
        )
        _document_security(spec, open_paths)
    return spec


_PROBES = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}


def _document_security(spec: dict[str, Any], open_paths: set[str]) -> None:
    """With API keys on: the two ways to present a key, and 401 / 403 / 429 on every
    operation that needs one."""
    spec["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    reasons = {
        "401": "No API key, or not a valid one",
        "403": "The API key lacks this operation's scope",
        "429": "The API key's rate limit is reached (see Retry-After)",
    }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in spec["paths"].items():
        if path in open_paths:
            continue
        for op in operations.values():
            op["security"] = [{"bearer": []}, {"apiKey": []}]
            for status, text in reasons.items():
                op["responses"][status] = {"description": text, "content": error}
            op["responses"]["429"]["headers"] = _RETRY_AFTER


def _plain_operation(path: str, op: dict[str, Any]) -> dict[str, Any]:
    op = copy.deepcopy(op)
    ok = op["responses"].get("200", {"description": "OK"})
    statuses: tuple[int, ...] = _EVERY_REQUEST
    if "{" in path:
        statuses += (404,)
    if path == "/readyz":
        statuses += (503,)
    if path == "/metrics":
        ok = {
            "description": "Prometheus text exposition",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    for param in op.get("parameters", []):
        param.get("schema", {}).pop("title", None)
    op["responses"] = {"200": ok, **_errors(statuses)}
    return op


def _protocol_operation(path: str, method: str, op: dict[str, Any]) -> dict[str, Any]:
    """Open Inference Protocol v2 routes: errors are ``{"error": "..."}``; inference takes
    the protocol's JSON form or its binary tensor data extension."""
    op = copy.deepcopy(op)
    op["tags"] = ["open inference protocol v2"]
    statuses: tuple[int, ...] = _EVERY_REQUEST
    if "{" in path:
        statuses += (404,)
    if path.endswith("/ready"):
        statuses += (503,)
    ok = op["responses"].get("200", {"description": "OK"})
    if method == "post":
        statuses = _PREDICT_ERRORS
        op["requestBody"] = {"required": True, "content": INFER_REQUEST}
        ok = {
            "description": "Output tensors (JSON, or a JSON header then binary tensor data)",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    op["responses"] = {"200": ok, **_errors(statuses, "ProtocolError")}
    return op


def _errors(statuses: tuple[int, ...], schema: str = "Error") -> dict[str, Any]:
    out = {}
    for status in sorted(set(statuses)):
        response: dict[str, Any] = {
            "description": _REASONS[status],
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
        if status == 503:
            response["headers"] = _RETRY_AFTER
        out[str(status)] = response
    return out


def predict_operation(mv: ModelVersion, path: str) -> dict[str, Any]:
    manifest = mv.manifest
    body = input_schema(mv)
    multipart = input_schema(mv, multipart=True)
    parameters = []
    if path in ("/predict", "/v1/predict"):
        summary = f"Predict with the default model ({manifest.name})"
        parameters.append(
            {
                "name": "model",
                "in": "query",
                "required": False,
                "description": "Another model by name (its inputs are as its own "
                "/models/{name}/predict operation describes)",
                "schema": {"type": "string"},
            }
        )
    else:
        summary = f"Predict with {manifest.name}" + (
            f" version {mv.version}" if "/versions/" in path else ""
        )
    coverage: dict[str, Any] = {"type": "number"}
    if manifest.decision is not None:
        coverage = {"type": "number", "enum": sorted(manifest.decision.levels)}
    parameters.append(
        {
            "name": "coverage",
            "in": "query",
            "required": False,
            "description": "Coverage of the prediction set (a level the model was fitted for)",
            "schema": coverage,
        }
    )
    decision = manifest.decision
    kinds = list(SET_KINDS) if decision is None or decision.marginal else ["class"]
    sets = "Prediction set kind: class (every class covered at the level; the default) or "
    sets += "marginal (covered on average over cases; smaller sets)"
    schema = {"type": "string", "enum": kinds}
    parameters.append({"name": "sets", "in": "query", "description": sets, "schema": schema})
    return {
        "tags": ["predict"],
        "summary": summary,
        "operationId": "predict_" + path.strip("/").replace("/", "_").replace("-", "_"),
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": multipart,
                    "encoding": {
                        "image": {"contentType": "image/jpeg, image/png"},
                        "tabular": {"contentType": "application/json"},
                    },
                },
                "application/json": {"schema": body},
            },
        },
        "responses": {
            "200": {
                "description": "Calibrated probabilities and decision support",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Prediction"}}
                },
            },
            **_errors(_PREDICT_ERRORS),
        },
    }


def input_schema(mv: ModelVersion, multipart: bool = False) -> dict[str, Any]:
    """What one model accepts. JSON: a base64 image and/or tabular fields (a null image or
    tabular means "not sent"). Multipart: the image file, always, and optionally the tabular
    fields as a JSON part; requests without an image are sent as JSON."""
    manifest = mv.manifest
    if multipart:
        image: dict[str, Any] = {"type": "string", "format": "binary"}
    else:
        image = {"type": "string", "format": "byte", "description": "base64 JPEG or PNG"}
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["image"],
        "properties": {"image": image},
    }
    if manifest.tabular is None:
        # Accepted and ignored (the response warns); a multipart part must still be JSON.
        schema["properties"]["tabular"] = {
            "description": "ignored: this model takes no tabular input",
            **({"type": "object"} if multipart else {}),
        }
        return schema
    fields = manifest.tabular.fields
    tokens = sorted(manifest.tabular.missing_values)
    schema["properties"]["tabular"] = {
        "type": "object" if multipart else ["object", "null"],
        "additionalProperties": False,
        "properties": {f.name: _field(f, tokens) for f in fields},
    }
    if multipart or not manifest.image_optional:
        return schema
    # JSON without an image: the tabular fields must hold at least one value.
    del schema["required"]
    image["type"] = ["string", "null"]
    with_value = [{"required": [f.name], "properties": {f.name: _field(f, [])}} for f in fields]
    schema["if"] = {"not": {"required": ["image"], "properties": {"image": {"type": "string"}}}}
    schema["then"] = {
        "required": ["tabular"],
        "properties": {"tabular": {"type": "object", "anyOf": with_value}},
    }
    return schema


def _field(spec: FieldSpec, missing_tokens: list[str]) -> dict[str, Any]:
    if spec.kind == "numeric":
        value: dict[str, Any] = {"type": "number"}
        if spec.minimum is not None:
            value["minimum"] = spec.minimum
        if spec.maximum is not None:
            value["maximum"] = spec.maximum
        if spec.unit:
            value["description"] = spec.unit
    else:
        value = {"type": "string", "enum": list(spec.categories)}
    if not missing_tokens:
        return value
    # null or a "not recorded" token means the field is missing.
    return {"anyOf": [value, {"type": "null"}, {"type": "string", "enum": missing_tokens}]}
