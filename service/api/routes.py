"""Route handlers: thin, each one parse -> pipeline -> respond."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.api.auth import require, require_health, require_metrics
from service.api.parsing import decode_request, request_id_from
from service.decision import SET_KINDS
from service.errors import InvalidRequest, NotReady, ServiceError
from service.pipeline import ServiceContext, predict
from service.registry import ModelVersion, Registry

log = logging.getLogger("service.api")
router = APIRouter()
PREDICT = [Depends(require("predict"))]
READ = [Depends(require("models:read"))]
SetKind = Literal[SET_KINDS]


def _ctx(request: Request) -> ServiceContext:
    return request.app.state.ctx


async def _predict(
    request: Request,
    name: str | None,
    version: str | None,
    coverage: float | None = None,
    sets: SetKind | None = None,
) -> JSONResponse:
    ctx = _ctx(request)
    start = time.perf_counter()
    request_id = request.state.request_id = request_id_from(request)
    model_label = name or ctx.registry.default_model or "?"
    try:
        if not ctx.ready:
            raise NotReady("models are not loaded yet")
        _refuse_unknown_query(
            request, {"coverage", "sets"} if "name" in request.path_params else _DEFAULT_QUERY
        )
        model = ctx.registry.get(name, version)
        model_label = model.name
        with ctx.admit(), ctx.hold(model):
            raw = await decode_request(request)
            raw.request_id = request_id
            raw.coverage = coverage
            raw.sets = sets
            body = await predict(ctx, raw, model)
    except ServiceError as exc:
        ctx.metrics.requests.labels(model_label, exc.code).inc()
        _log_request(request, request_id, model_label, exc.status, exc.code, start)
        raise
    except Exception:
        # Answered as a plain 500 by the error handler; still counted and logged here.
        ctx.metrics.requests.labels(model_label, "internal_error").inc()
        _log_request(request, request_id, model_label, 500, "internal_error", start)
        raise
    _log_request(request, request_id, model_label, 200, "ok", start)
    return JSONResponse(body, headers={"X-Request-ID": body["request_id"]})


_DEFAULT_QUERY = {"model", "coverage", "sets"}


def _refuse_unknown_query(request: Request, accepted: set[str]) -> None:
    # A misspelt parameter (``?coverge=0.8``) must not be silently ignored.
    if set(request.query_params) - accepted:
        raise InvalidRequest(
            f"unknown query parameter; accepted: {', '.join(sorted(accepted)) or 'none'}"
        )


def _log_request(
    request: Request, request_id: str, model: str, status: int, code: str, start: float
) -> None:
    log.info(
        "predict",
        extra={
            "request_id": request_id,
            "key": getattr(request.state, "key_name", None),
            "model": model,
            "status": status,
            "code": code,
            "timing_ms": round((time.perf_counter() - start) * 1e3, 2),
        },
    )


@router.post("/predict", tags=["predict"], dependencies=PREDICT)
async def predict_default(
    request: Request,
    model: str | None = None,
    coverage: float | None = None,
    sets: SetKind | None = None,
) -> JSONResponse:
    """Predict with the default model, or the newest version of ``model``. ``coverage``
    picks the prediction set's level (one the manifest fitted, e.g. 0.8, 0.9, 0.95);
    ``sets`` its kind (``class``: every class covered at the level; ``marginal``: on
    average over cases)."""
    return await _predict(request, model, None, coverage, sets)


@router.post("/v1/predict", tags=["predict"], dependencies=PREDICT)
async def predict_v1(
    request: Request,
    model: str | None = None,
    coverage: float | None = None,
    sets: SetKind | None = None,
) -> JSONResponse:
    return await _predict(request, model, None, coverage, sets)


@router.post("/models/{name}/predict", tags=["predict"], dependencies=PREDICT)
async def predict_model(
    request: Request, name: str, coverage: float | None = None, sets: SetKind | None = None
) -> JSONResponse:
    return await _predict(request, name, None, coverage, sets)


@router.post("/models/{name}/versions/{version}/predict", tags=["predict"], dependencies=PREDICT)
async def predict_version(
    request: Request,
    name: str,
    version: str,
    coverage: float | None = None,
    sets: SetKind | None = None,
) -> JSONResponse:
    return await _predict(request, name, version, coverage, sets)


@router.get("/models", tags=["models"], dependencies=READ)
async def list_models(request: Request) -> dict[str, Any]:
    registry = _ctx(request).registry
    return {
        "default": registry.default_model,
        "models": [
            {
                "name": name,
                "versions": _served(registry, name),
                "latest": registry.get(name).version,
                "labels": list(registry.get(name).manifest.labels),
                "tabular": registry.get(name).manifest.has_tabular,
            }
            for name in registry.names()
            if _served(registry, name)
        ],
    }


@router.get("/models/{name}", tags=["models"], dependencies=READ)
async def describe_model(request: Request, name: str) -> dict[str, Any]:
    registry = _ctx(request).registry
    latest = registry.get(name)
    out: dict[str, Any] = {
        "name": name,
        "versions": _served(registry, name),
        "latest": _described(latest),
    }
    # Left out by the self-check, here or (behind a shared queue) by every live worker.
    refused = [
        {"version": r.version, "self_check": r.check.to_dict()}
        if r.check is not None
        else {"version": r.version, "refused_by": "workers"}
        for r in registry.refused.values()
        if r.name == name
    ]
    if refused:
        out["refused"] = refused
    return out


def _served(registry: Registry, name: str) -> list[str]:
    return [mv.version for mv in registry.versions(name) if mv.key not in registry.refused]


@router.get("/models/{name}/versions/{version}", tags=["models"], dependencies=READ)
async def describe_version(request: Request, name: str, version: str) -> dict[str, Any]:
    return _described(_ctx(request).registry.get(name, version))


def _described(mv: ModelVersion) -> dict[str, Any]:
    """The manifest's public view, and how this replica runs the version."""
    serving = mv.engine.describe() if mv.engine is not None else {"runs_on": "queue workers"}
    return {**mv.manifest.public_view(), "serving": serving}


@router.get("/healthz", tags=["ops"], dependencies=[Depends(require_health)])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], dependencies=[Depends(require_health)])
async def readyz(request: Request) -> JSONResponse:
    ok, body = _ctx(request).readiness()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", tags=["ops"], dependencies=[Depends(require_metrics)])
async def metrics(request: Request) -> Response:
    ctx = _ctx(request)
    for mv in ctx.registry.all():
        ctx.metrics.queue_depth.labels(mv.name, mv.version).set(ctx.queue.depth(mv.key))
    return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
