"""Connections to Redis (the queue; the API keys' budgets): a fixed set per process, opened
at start.

Serving must not depend on the name service. A pool that grows on demand opens its new
connections exactly when load rises, and each one first looks up the server's name; if the
resolver stalls then, the request behind it waits for seconds or fails. That is what
happens on podman with Debian's aardvark-dns 1.4: for 20-40 s after a container of the
deployment stops, name lookups hang, while connections already open keep working. So each
process opens its connections once, at start, and waits for a free one rather than
opening more; only a connection that broke (the server restarted) is opened again.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

# How long a command waits for a free connection when all are in use before it fails as a
# connection error (then handled as any other: retried or answered 503).
POOL_WAIT_S = 5.0


def open_client(
    url: str,
    size: int,
    name: str,
    *,
    socket_timeout: float,
    connect_timeout: float | None = None,
) -> aioredis.Redis:
    """A client whose pool holds at most ``size`` connections, each named ``name`` on the
    server (``CLIENT LIST`` tells API replicas from workers)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        client_name=name,
        timeout=POOL_WAIT_S,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
    )
    return aioredis.Redis.from_pool(pool)


async def warm(client: aioredis.Redis, within_s: float = 5.0) -> None:
    """Open the rest of ``client``'s pool now. Only while a connection is free, so that the
    tasks already using the pool never wait on this. A server not reachable yet is not an
    error: the remaining connections are opened when first needed."""
    pool = client.connection_pool
    held: list[AbstractConnection] = []

    async def fill() -> None:
        while len(held) < pool.max_connections and pool.can_get_connection():
            held.append(await pool.get_connection())

    try:
        with contextlib.suppress(RedisError, TimeoutError, OSError):
            await asyncio.wait_for(fill(), within_s)
    finally:
        for connection in held:
            await pool.release(connection)
