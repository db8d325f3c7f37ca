"""Worker process: the consumer plus a small HTTP server for /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from service.config import Settings
from service.metrics import WorkerMetrics
from service.queue.factory import redacted
from service.registry import load_from_settings
from service.worker.consumer import Worker

log = logging.getLogger("service.worker")


def create_worker_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="endofuse worker", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = {"consumer": worker.consumer, "models": [m.key for m in worker.models.values()]}
        if not worker.ready:
            return JSONResponse({"status": "not ready", **body}, status_code=503)
        return JSONResponse({"status": "ready", **body})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def serve_worker(settings: Settings) -> None:
    if settings.queue_url.startswith("memory://"):
        raise SystemExit("a worker needs a shared queue: pass --queue redis://host:port/db")
    registry = load_from_settings(settings)
    worker = Worker(settings, registry, WorkerMetrics())
    config = uvicorn.Config(
        create_worker_app(worker),
        host=settings.host,
        port=settings.worker_port,
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    # The worker owns SIGTERM/SIGINT (finish the batch in hand, then exit), not uvicorn.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    http = asyncio.create_task(server.serve(), name="worker-http")
    log.info(
        "worker started",
        extra={"models": [mv.key for mv in registry.all()], "queue": redacted(settings.queue_url)},
    )
    try:
        await worker.run()
    finally:
        server.should_exit = True
        await http
