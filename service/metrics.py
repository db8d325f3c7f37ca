"""Prometheus metrics, one registry per app so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "endofuse_requests",
            "Prediction requests by model and outcome (ok or an error code).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "endofuse_request_seconds",
            "End-to-end prediction latency inside the service.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "endofuse_stage_seconds",
            "Latency per stage: decode (image + tabular), queue (waiting), inference (batch run).",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "endofuse_batch_size",
            "Requests per inference batch.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "endofuse_queue_depth",
            "Requests waiting for inference.",
            ["model", "version"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "endofuse_model_info",
            "Loaded model versions (value 1); default=true marks the default model's newest.",
            ["model", "version", "providers", "default"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "endofuse_ready", "1 once models are loaded and warmed.", registry=self.registry
        )

    def observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
