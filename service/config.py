"""Service settings: one pydantic-settings class, read from ``ENDOFUSE_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENDOFUSE_", env_file=None, extra="ignore")

    models_dir: Path = Path("models")
    # Restrict loading to these model names (empty = every model under models_dir).
    models: list[str] = Field(default_factory=list)
    default_model: str | None = None
    # Which versions answer requests that name no version: the newest of this precision
    # (int8: quantised variants, faster on CPUs with VNNI), else the newest of any.
    precision: Literal["fp32", "int8"] = "fp32"

    host: str = "127.0.0.1"
    port: int = 8000

    providers: Literal["auto", "cpu", "cuda"] = "auto"
    # Sessions per model version, each running its own batches at once (an instance group);
    # 0: by device, one single-threaded session per core on CPU, one on CUDA.
    engine_instances: int = Field(0, ge=0)
    # With several single-threaded sessions on CPU, one more on every core answers a request
    # that arrives while nothing else runs (low-load latency, docs/performance.md).
    solo_session: bool = True
    intra_op_threads: int = Field(
        0, ge=0, description="per session; 0: cores / sessions on CPU, else ONNX Runtime's pick"
    )
    inter_op_threads: int = Field(1, ge=0)
    # ORT worker threads busy-wait between runs by default; on a small CPU that steals cycles
    # from HTTP parsing and image decoding running beside inference.
    ort_spinning: bool = False
    warmup_runs: int = Field(2, ge=0)
    # At load each session answers the probe inputs recorded in the manifest (service/
    # selfcheck.py); past the tolerance (largest probability difference, or relative
    # out-of-distribution distance difference) "warn" serves with a warning, "refuse" leaves
    # that version out (503 model_unavailable when asked for) and serves the others.
    self_check: Literal["warn", "refuse", "off"] = "warn"
    self_check_tolerance: float = Field(0.01, gt=0)

    queue_url: str = "memory://"
    # The largest batch considered. With profile_batches each version's limit is measured at
    # load (service/batch_profile.py): the cheapest size per image whose batch finishes within
    # batch_latency_budget_ms; without, every version batches up to max_batch_size.
    max_batch_size: int = Field(16, ge=1)
    profile_batches: bool = True
    batch_latency_budget_ms: float = Field(100.0, gt=0)
    # Only applied once the engine is already busy: an idle engine runs a lone request at once.
    max_batch_wait_ms: float = Field(2.0, ge=0)
    max_queue_size: int = Field(256, ge=1)
    # Requests beyond what the measured service rate answers within this many seconds are
    # refused at once with 503 + Retry-After (service/admission.py); 0 turns it off.
    latency_budget_s: float = Field(1.0, ge=0)
    request_timeout_s: float = Field(10.0, gt=0)

    # redis:// deployments (API replicas + workers); see docs/deployment.md.
    queue_prefix: str = "endofuse"
    # A delivered entry idle this long belongs to a dead or stuck worker and is re-delivered;
    # must exceed the slowest batch, or healthy work runs twice.
    reclaim_idle_ms: int = Field(5000, ge=50)
    max_deliveries: int = Field(3, ge=1)
    # A departed worker's consumer (heartbeat expired, nothing pending) is deleted from the
    # group once it has been silent this long, so restarts do not pile consumers up.
    forget_consumer_s: float = Field(600.0, gt=0)
    stream_maxlen: int = Field(10_000, ge=100)
    reply_ttl_s: int = Field(60, ge=5)
    heartbeat_s: float = Field(1.0, gt=0)
    # Connections to Redis each process opens at start and keeps (service/queue/
    # connections.py); a worker opens more if its sessions need them.
    queue_connections: int = Field(16, ge=4)
    worker_block_ms: int = Field(200, ge=1)
    # Batches a worker reads beyond those its sessions are running, so that a session that
    # finishes finds its next batch in hand rather than behind a Redis round trip; 0 reads
    # only when a session is free.
    worker_read_ahead: int = Field(2, ge=0)
    worker_port: int = 8001
    # Seconds between looks at the model repository for versions added or removed (hot
    # reload, service/reload.py); 0 turns it off.
    reload_s: float = Field(5.0, ge=0)
    # Which models need a live worker before an API replica reports ready: "all" (every
    # loaded model), "none", or a comma list of model names.
    ready_workers: str = "all"

    # Decision support (models whose manifest has a ``decision`` block): the prediction set's
    # coverage when a request names none, and a top probability below which to refer.
    default_coverage: float = Field(0.9, gt=0, lt=1)
    # prediction sets when a request names none: per class (every class, rare ones included,
    # covered at the level) or marginal (covered on average over cases; smaller sets)
    default_sets: Literal["class", "marginal"] = "class"
    confidence_floor: float = Field(0.0, ge=0, le=1)

    # Edge limits (service/api/edge.py, service/api/limits.py): what one connection may take.
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    max_header_count: int = Field(100, ge=8)
    header_timeout_s: float = Field(10.0, gt=0)
    # The whole body must arrive within this: a client promising bytes it never sends
    # would otherwise hold its connection and a decode slot.
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    keep_alive_s: float = Field(5.0, gt=0)
    max_image_pixels: int = Field(40_000_000, ge=1)
    decode_threads: int = Field(2, ge=1)

    # Access control (service/api/auth.py): on when a keys file is given. Health, readiness
    # and metrics stay open for probes and scrapers unless auth_health / auth_metrics is set.
    api_keys_file: Path | None = None
    rate_limit: str | None = None  # per key, e.g. "20/second", unless the key sets its own
    auth_health: bool = False
    auth_metrics: bool = False

    log_level: str = "INFO"
