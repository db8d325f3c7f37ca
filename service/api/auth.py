"""API keys with scopes, and a request budget per key.

The keys file holds, per key, a name, scopes, an optional rate (``"20/second"``) and the
SHA-256 of the key, never the key itself: keys are 256-bit random tokens, so a fast hash is
as safe to store as a slow one. A presented key is hashed and compared with every stored hash
in constant time. Key names (never keys) go to logs and metrics.

Off when no keys file is configured (``make serve`` on 127.0.0.1); the compose deployment
configures one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request

from service.errors import QueueUnavailable, ServiceError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

SCOPES = ("predict", "models:read", "metrics")
KEY_PREFIX = "efk_"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: str  # sha256 hex of the key
    scopes: frozenset[str]
    rate: str | None = None  # e.g. "20/second"; None: the settings' default


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        raw = json.loads(Path(path).read_text()) if Path(path).exists() else {"keys": []}
        keys = []
        for entry in raw.get("keys", []):
            unknown = set(entry["scopes"]) - set(SCOPES)
            if unknown:
                raise ValueError(f"key '{entry['name']}': unknown scopes {sorted(unknown)}")
            keys.append(
                ApiKey(
                    entry["name"], entry["sha256"], frozenset(entry["scopes"]), entry.get("rate")
                )
            )
        return cls(keys)

    def find(self, presented: str) -> ApiKey | None:
        wanted = digest(presented)
        found = None
        for key in self.keys:  # every entry compared: the time does not tell which matched
            if hmac.compare_digest(key.digest, wanted):
                found = key
        return found


def create_key(path: Path, name: str, scopes: list[str], rate: str | None = None) -> str:
    """Add a key to the keys file (created 0600) and return it; only its hash is stored."""
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}")
    path = Path(path)
    raw: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"keys": []}
    if any(entry["name"] == name for entry in raw["keys"]):
        raise ValueError(f"a key named '{name}' exists already")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"name": name, "sha256": digest(key), "scopes": sorted(scopes)}
    if rate:
        entry["rate"] = rate
    entry["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    raw["keys"].append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(raw, f, indent=2)
    return key


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


class Access:
    """Checks a request's key and scope, then spends from that key's budget."""

    def __init__(
        self,
        store: KeyStore,
        default_rate: str | None,
        storage_url: str,
        redis: aioredis.Redis | None = None,
    ) -> None:
        """``redis``: the client whose connections a ``redis://`` budget store uses."""
        from limits import parse
        from limits.aio.strategies import MovingWindowRateLimiter
        from limits.storage import storage_from_string

        self.store = store
        self.default_rate = default_rate
        self.redis = redis
        self._parse = parse
        options: dict[str, Any] = {}
        if storage_url.startswith("async+redis"):
            options["implementation"] = "redispy"
        if redis is not None:
            options["connection_pool"] = redis.connection_pool
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_url, **options))

    def spends(self) -> bool:
        """Whether any request is counted against a budget (then the store is used)."""
        return bool(self.default_rate) or any(k.rate for k in self.store.keys)

    async def check(self, request: Request, scope: str) -> ApiKey:
        presented = presented_key(request)
        if presented is None:
            raise Unauthorized("an API key is required (Authorization: Bearer, or X-API-Key)")
        key = self.store.find(presented)
        if key is None:
            raise Unauthorized("the API key is not valid")
        if scope not in key.scopes:
            raise Forbidden(f"this API key lacks the '{scope}' scope")
        rate = key.rate or self.default_rate
        if rate:
            item = self._parse(rate)
            try:
                allowed = await self._limiter.hit(item, "endofuse", key.name)
                stats = (
                    None
                    if allowed
                    else await self._limiter.get_window_stats(item, "endofuse", key.name)
                )
            except Exception as exc:  # the budget store (Redis) is unreachable
                raise QueueUnavailable("the rate-limit store is unreachable") from exc
            if stats is not None:
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                raise RateLimited(f"rate limit of {rate} reached for this key", retry_after=wait)
        return key


def require(scope: str):
    """Dependency: a key with ``scope`` when access control is on; nothing otherwise."""

    async def dependency(request: Request) -> None:
        access: Access | None = getattr(request.app.state, "access", None)
        if access is None:
            return
        key = await access.check(request, scope)
        request.state.key_name = key.name
        request.app.state.ctx.metrics.key_requests.labels(key.name).inc()

    return dependency


async def require_health(request: Request) -> None:
    """Probes reach health and readiness without a key, unless ``auth_health`` is set."""
    if request.app.state.ctx.settings.auth_health:
        await require("models:read")(request)


async def require_metrics(request: Request) -> None:
    """Scrapers reach /metrics without a key, unless ``auth_metrics`` is set; then a key
    with the ``metrics`` scope."""
    if request.app.state.ctx.settings.auth_metrics:
        await require("metrics")(request)
