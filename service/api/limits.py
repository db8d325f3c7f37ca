"""Request limits the ASGI layer enforces once a request's head has arrived: header count,
body size (while the body streams in, not only from Content-Length) and body time."""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_body


class RequestLimitsMiddleware:
    """Buffer request bodies up to ``max_bytes`` within ``body_timeout_s``; past either, answer
    413 / 408 (and close the connection) without calling the app.

    Buffering is fine here: every prediction needs its whole image before decoding anyway,
    and the cap bounds the memory a request can take.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, body_timeout_s: float, max_header_count: int
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.max_header_count = max_header_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope.get("headers", ())) > self.max_header_count:
            many = f"more than {self.max_header_count} header fields"
            await _reject(scope, send, 431, "too_many_headers", many)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _too_large(scope, send, self.max_bytes)
            return
        try:
            whole = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
        except asyncio.TimeoutError:
            late = f"request body not received within {self.body_timeout_s:g} s"
            await _reject(scope, send, 408, "request_timeout", late)
            return
        if whole is None:
            return  # the client went away
        if len(whole) > self.max_bytes:
            await _too_large(scope, send, self.max_bytes)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body; stops reading one chunk past the cap (the caller answers 413)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            chunks.append(body)
            if size > self.max_bytes or not message.get("more_body", False):
                return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(scope: Scope, send: Send, limit: int) -> None:
    await _reject(scope, send, 413, "payload_too_large", f"request body exceeds {limit} bytes")


async def _reject(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    # Connection: close, since the rest of the body (if any) is never read.
    body = json.dumps(error_body(scope.get("path", ""), code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
