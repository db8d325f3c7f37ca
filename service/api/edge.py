"""Connection-level limits, below the ASGI app: request-head size and the time a client may
take to send it.

uvicorn's httptools parser buffers a request head of any size and no uvicorn option bounds
how long a client may take to send one, so a 16 MiB header or a head dribbled one byte a
minute would hold memory and a connection. The h11 protocol is subclassed to count head bytes
as they arrive and to time the head; both refusals are answered (431 / 408, ``Connection:
close``) and the connection is then drained briefly before it closes, so that a client still
sending reads the answer instead of a reset. Body size and body time are bounded by the
ASGI layer (``limits.RequestLimitsMiddleware``), which sees the request after its head.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.errors import error_body
from service.config import Settings

# How long a refused connection keeps reading (and discarding) before it closes.
_LINGER_S = 1.0
_END_OF_HEAD = b"\r\n\r\n"


@dataclass(frozen=True)
class EdgeLimits:
    max_header_bytes: int
    header_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        return cls(settings.max_header_bytes, settings.header_timeout_s)


@functools.cache
def _limits_from_environment() -> EdgeLimits:
    # Worker processes of ``serve --workers N`` are spawned and read ENDOFUSE_* themselves.
    return EdgeLimits.from_settings(Settings())


def raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response, written before h11 has a request to answer."""
    # No request path is known yet: the service's own error shape, as on every other route.
    body = json.dumps(error_body("", code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a bounded request head, in bytes and in time."""

    limits: ClassVar[EdgeLimits | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = type(self).limits or _limits_from_environment()
        self._head_bytes = 0
        self._tail = b""  # last bytes of the head so far: the end marker may straddle reads
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # draining: the answer is already on its way
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            large = f"request head exceeds {self._limits.max_header_bytes} bytes"
            self._refuse(431, "Request Header Fields Too Large", "header_too_large", large)
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head_bytes, self._tail = 0, b""
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head is timed too

    def _head_too_large(self, data: bytes) -> bool:
        seen = self._tail + data
        end = seen.find(_END_OF_HEAD)
        if end >= 0:
            head = self._head_bytes - len(self._tail) + end + len(_END_OF_HEAD)
            return head > self._limits.max_header_bytes
        self._head_bytes += len(data)
        self._tail = seen[-(len(_END_OF_HEAD) - 1) :]
        return self._head_bytes > self._limits.max_header_bytes

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_bytes, self._tail = 0, b""
        self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes == 0:
            self.transport.close()  # an idle connection: nothing to answer
            return
        late = f"request head not received within {self._limits.header_timeout_s:g} s"
        self._refuse(408, "Request Timeout", "request_timeout", late)

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        self._refused = True
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self.logger.warning("refused connection", extra={"status": status, "code": code})
        self.transport.write(raw_error(status, reason, code, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


def uvicorn_options(settings: Settings, bind_limits: bool = True) -> dict[str, Any]:
    """The uvicorn keyword arguments every server of this app runs with.

    ``bind_limits``: a protocol class of its own carries these settings' limits (several
    servers in one process keep theirs apart). Off for ``serve --workers N``, whose spawned
    processes cannot receive a class made at run time and read the limits from ENDOFUSE_*."""
    protocol: type[GuardedH11Protocol] = GuardedH11Protocol
    if bind_limits:
        limits = EdgeLimits.from_settings(settings)
        protocol = type("BoundGuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return {
        "http": protocol,
        # h11's own cap stays above ours, so that ours answers first (with 431, not 400).
        "h11_max_incomplete_event_size": 2 * settings.max_header_bytes,
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
        "log_config": None,
        "access_log": False,
    }
