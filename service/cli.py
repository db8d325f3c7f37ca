"""``endofuse`` command line: serve, worker, self-check, keys; the model commands live in
``service.cli_models`` and are merged in here."""

from __future__ import annotations

from pathlib import Path

import typer

from service.cli_models import models

app = typer.Typer(add_completion=False, no_args_is_help=True, help="endofuse inference service")


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address (ENDOFUSE_HOST)"),
    port: int = typer.Option(None, help="Port (ENDOFUSE_PORT)"),
    models_dir: Path = typer.Option(None, "--models-dir", help="Model repository"),
    queue: str = typer.Option(
        None, "--queue", help="memory:// (embedded, default) or redis://host:port/db (API only)"
    ),
    workers: int = typer.Option(1, help="uvicorn worker processes"),
) -> None:
    """Serve every model in the model repository over HTTP."""
    import uvicorn

    from service.api.edge import uvicorn_options
    from service.config import Settings
    from service.logs import configure_logging

    overrides = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "models_dir": models_dir,
            "queue_url": queue,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    if workers > 1:
        import os
        import tempfile

        # Several processes behind one port: metrics go through shared files (see metrics.py).
        os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="endofuse-metrics-")
        )

        for key, value in overrides.items():
            os.environ[f"ENDOFUSE_{key.upper()}"] = str(value)
        uvicorn.run(
            "service.api.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            **uvicorn_options(settings, bind_limits=False),
        )
        return
    from service.api import create_app

    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, **uvicorn_options(settings)
    )


@app.command()
def worker(
    queue: str = typer.Option(None, "--queue", help="redis://host:port/db (ENDOFUSE_QUEUE_URL)"),
    models: str = typer.Option(None, "--models", help="Comma list of model names (default all)"),
    models_dir: Path = typer.Option(None, "--models-dir", help="Model repository"),
    host: str = typer.Option(None, help="Bind address of the health/metrics port"),
    port: int = typer.Option(None, help="Health/metrics port (ENDOFUSE_WORKER_PORT)"),
) -> None:
    """Run inference for API replicas from the Redis request streams."""
    import asyncio

    from service.config import Settings
    from service.logs import configure_logging
    from service.worker.app import serve_worker

    overrides: dict = {"queue_url": queue} if queue else {}
    if models:
        overrides["models"] = [m.strip() for m in models.split(",") if m.strip()]
    for key, value in {"models_dir": models_dir, "host": host, "worker_port": port}.items():
        if value is not None:
            overrides[key] = value
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    asyncio.run(serve_worker(settings))


@app.command("self-check")
def self_check(
    model_dir: Path = typer.Argument(..., exists=True, help="A version, e.g. models/m/2"),
    record: bool = typer.Option(
        False, "--record", help="Write this host's outputs on the probes into the manifest"
    ),
    tolerance: float = typer.Option(0.01, help="Largest difference that passes"),
) -> None:
    """Whether this host answers the manifest's probe inputs as recorded (exit 1 if not);
    with --record, record this host's answers instead."""
    import json

    from service import selfcheck

    if record:
        block = selfcheck.record(model_dir)
        typer.echo(f"recorded {len(block['probabilities'])} probe outputs in {model_dir}")
        return
    result = selfcheck.check_dir(model_dir, tolerance)
    typer.echo(json.dumps(result.to_dict(), indent=2))
    if result.status not in ("pass", "no reference"):
        raise typer.Exit(1)


keys = typer.Typer(help="API keys: the keys file stores names, scopes and hashes only")
app.add_typer(keys, name="keys")


@keys.command("create")
def keys_create(
    name: str = typer.Argument(..., help="A name for the client; it appears in logs"),
    scopes: str = typer.Option(..., "--scopes", help="Comma list of predict, models:read, metrics"),
    file: Path = typer.Option(
        None, "--file", help="Keys file (default ENDOFUSE_API_KEYS_FILE, else keys.json)"
    ),
    rate: str | None = typer.Option(None, "--rate", help='e.g. "20/second"; default: settings'),
) -> None:
    """Create a key and print it once: only its hash is kept."""
    import os

    from service.api.auth import create_key

    path = file or Path(os.environ.get("ENDOFUSE_API_KEYS_FILE", "keys.json"))
    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    try:
        key = create_key(path, name, wanted, rate)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(key)
    typer.echo(f"stored the hash of key '{name}' in {path}; the key is not shown again", err=True)


# Registered last, so ``endofuse --help`` lists the serving commands first.
app.add_typer(models)


if __name__ == "__main__":
    app()
