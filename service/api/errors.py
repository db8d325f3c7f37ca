"""The one place where errors become HTTP responses: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError

log = logging.getLogger("service.api")


def is_oip(path: str) -> bool:
    """Open Inference Protocol routes answer errors as the protocol says: ``{"error": "..."}``."""
    return path == "/v2" or path.startswith("/v2/")


def error_body(path: str, code: str, message: str) -> dict:
    return {"error": message} if is_oip(path) else {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, retry_after: float | None = None, path: str = ""
) -> JSONResponse:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(error_body(path, code, message), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        retry = exc.retry_after if exc.status in (429, 503) else None
        if exc.status == 503 and retry is None:
            retry = 1.0
        response = error_response(exc.status, exc.code, exc.message, retry, request.url.path)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="endofuse"'
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            response.headers["X-Request-ID"] = request_id
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, code, str(exc.detail), path=request.url.path)
        # RFC 9110: a 405 names the methods the route does allow (the router supplies them).
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Report where, never the offending input.
        where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors())
        message = f"invalid request parameters: {where}"
        return error_response(422, "invalid_request", message, path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
        return error_response(500, "internal_error", "internal error", path=request.url.path)
