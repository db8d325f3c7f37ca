"""App factory. Nothing heavy happens at import: models load in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from redis.exceptions import RedisError

from service import __version__, looplag
from service.admission import AdmissionControl
from service.api.auth import Access, KeyStore
from service.api.errors import install_error_handlers
from service.api.limits import RequestLimitsMiddleware
from service.api.oip import router as oip_router
from service.api.openapi import install_openapi
from service.api.routes import router
from service.config import Settings
from service.metrics import Metrics, multiprocess
from service.pipeline import ServiceContext
from service.queue import connections, create_queue
from service.queue.factory import redacted, uses_remote_workers
from service.registry import ModelVersion, Registry, load_from_settings
from service.reload import ModelWatcher

log = logging.getLogger("service")


def load_registry(settings: Settings) -> Registry:
    # Behind a redis:// queue the API only validates and decodes: workers own the sessions.
    return load_from_settings(settings, load_engines=not uses_remote_workers(settings))


WEB = Path(__file__).resolve().parent.parent / "web"


def install_web(app: FastAPI) -> None:
    """The clinician page at ``/``: static files, a client of the public API."""
    app.mount("/web", StaticFiles(directory=WEB), name="web")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        # Everything the page loads comes from this service (it runs air-gapped).
        csp = "default-src 'self'; img-src 'self' blob:; object-src 'none'"
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": csp})


def access_from_settings(settings: Settings) -> Access | None:
    if settings.api_keys_file is None:
        return None
    # Budgets live beside the queue: in Redis, every replica spends from the same one.
    url = settings.queue_url
    store = KeyStore.load(settings.api_keys_file)
    if not url.startswith(("redis://", "rediss://")):
        return Access(store, settings.rate_limit, "async+memory://")
    # Its own few connections, opened at start like the queue's (service/queue/connections.py).
    name = f"endofuse-limits:{socket.gethostname()}:{os.getpid()}"
    redis = connections.open_client(url, 4, name, socket_timeout=5, connect_timeout=2)
    return Access(store, settings.rate_limit, "async+" + url, redis)


def publish_model_info(metrics: Metrics, registry: Registry) -> None:
    metrics.model_info.clear()
    for mv in registry.all():
        if mv.key in registry.refused:
            continue
        is_default = mv.name == registry.default_model and mv is registry.newest(mv.name)
        metrics.model_info.labels(
            mv.name,
            mv.version,
            ",".join(mv.engine.providers) if mv.engine else "remote",
            str(is_default).lower(),
        ).set(1)
    metrics.serving.publish(registry)


def refreshed(app: FastAPI, ctx: ServiceContext) -> None:
    """After the set of routed versions changed: the OpenAPI document is rebuilt on its next
    request, and the model gauges say what is served now."""
    app.openapi_schema = None
    publish_model_info(ctx.metrics, ctx.registry)


def model_watcher(app: FastAPI, ctx: ServiceContext) -> ModelWatcher:
    """Hot reload for this replica: the queue serves a version before the registry names it,
    and the OpenAPI document is rebuilt for the new set."""

    def changed() -> None:
        refreshed(app, ctx)

    async def removed(mv: ModelVersion) -> None:
        # Requests that resolved this version before it was removed still get their answer.
        await ctx.released(mv, ctx.settings.request_timeout_s + ctx.settings.body_timeout_s)
        await ctx.queue.remove_model(mv)

    def publishable(mv: ModelVersion) -> bool:
        workers = ctx.queue.workers()  # behind a shared queue: once a worker serves it
        return workers is None or workers.get(mv.key, 0) > 0

    watcher = ModelWatcher(
        ctx.registry,
        ctx.settings.models_dir,
        ctx.metrics.model_events,
        ctx.queue.add_model,
        removed,
        only=ctx.settings.models or None,
        publishable=publishable,
        on_changed=changed,
    )
    return watcher


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """Build the app. Pass ``registry`` to reuse already-loaded models (tests, benchmarks)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A manifest/graph mismatch raises here and start-up stops with its message.
        reg = registry or load_registry(settings)
        metrics = Metrics()
        queue = create_queue(settings, reg, metrics)
        await queue.start()
        pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        ctx = ServiceContext(settings, reg, queue, metrics, pool)
        if settings.latency_budget_s > 0:
            # One full batch is always admitted: it is the unit the engine runs in, and a
            # cold first request measured slow must not shut the door on it.
            floor = max(4, settings.max_batch_size)
            ctx.admission = AdmissionControl(settings.latency_budget_s, min_in_flight=floor)
        publish_model_info(metrics, reg)

        def listener() -> None:  # a version refused, or served again
            refreshed(app, ctx)

        reg.listeners.append(listener)
        app.state.ctx = ctx
        watcher = None
        if settings.reload_s > 0:
            watcher = asyncio.create_task(
                model_watcher(app, ctx).run(settings.reload_s), name="model-watcher"
            )
        lag = asyncio.create_task(looplag.watch(metrics.loop_lag), name="loop-lag")
        access = app.state.access = access_from_settings(settings)
        warming = None
        if access is not None and access.redis is not None and access.spends():
            warming = asyncio.create_task(connections.warm(access.redis), name="limits-connect")
        ctx.ready = True
        metrics.ready.set(1)
        log.info(
            "ready",
            extra={"models": [mv.key for mv in reg.all()], "queue": redacted(settings.queue_url)},
        )
        try:
            yield
        finally:
            for task in (lag, watcher, warming):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            ctx.ready = False
            metrics.ready.set(0)
            reg.listeners.remove(listener)
            await queue.stop()
            if access is not None and access.redis is not None:
                with contextlib.suppress(RedisError, TimeoutError):
                    await asyncio.wait_for(access.redis.aclose(), 5)
            pool.shutdown(wait=True)
            if multiprocess():
                from prometheus_client import multiprocess as mp

                mp.mark_process_dead(os.getpid())

    app = FastAPI(
        title="endofuse",
        version=__version__,
        description="Calibrated multimodal diagnosis probabilities from an endoscopy frame "
        "and optional tabular clinical fields.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(oip_router)
    install_openapi(app)
    install_web(app)
    app.add_middleware(
        RequestLimitsMiddleware,
        max_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_header_count=settings.max_header_count,
    )
    return app
