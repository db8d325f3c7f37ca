"""Build the queue a URL names. Beside the backends, so the contract (``base``) imports
neither of them."""

from __future__ import annotations

from service.config import Settings
from service.metrics import Metrics
from service.queue.base import InferenceQueue
from service.queue.embedded import EmbeddedQueue
from service.queue.redis_queue import RedisQueue
from service.registry import Registry


def create_queue(
    settings: Settings, registry: Registry, metrics: Metrics | None = None
) -> InferenceQueue:
    """The backend named by ``settings.queue_url``: ``memory://`` or ``redis://host:port/db``."""
    url = settings.queue_url
    scheme = url.split("://", 1)[0]
    if scheme == "memory":
        return EmbeddedQueue(
            registry,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1e3,
            max_queue_size=settings.max_queue_size,
            on_batch=metrics.observe_batch if metrics else None,
        )
    if scheme in ("redis", "rediss", "unix"):
        return RedisQueue(
            registry,
            url,
            max_queue_size=settings.max_queue_size,
            prefix=settings.queue_prefix,
            stream_maxlen=settings.stream_maxlen,
            reply_ttl_s=settings.reply_ttl_s,
            heartbeat_s=settings.heartbeat_s,
            connections=settings.queue_connections,
            metrics=metrics,
        )
    raise ValueError(f"unsupported queue URL scheme '{scheme}://' (supported: memory://, redis://)")


def uses_remote_workers(settings: Settings) -> bool:
    return not settings.queue_url.startswith("memory://")


def redacted(url: str) -> str:
    """The queue URL without credentials, for logs."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rsplit("@", 1)[-1]
