"""Prometheus metrics, one registry per app so several apps (tests) never collide.

With several processes behind one port (``endofuse serve --workers N``) each process writes
its samples to ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` merges them, so a scrape sees the
whole replica whichever process answers it.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from service.looplag import lag_histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOP_PROBABILITY_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# Frame shapes of capture set-ups: square crops, 5:4, 4:3 and the 1.16-1.19 of endoscopy
# processors, 3:2, 16:9 and wider.
ASPECT_BUCKETS = (0.8, 1.0, 1.1, 1.15, 1.2, 1.26, 1.3, 1.34, 1.45, 1.55, 1.7, 1.8, 2.0)
MEGAPIXEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
OOD_MARGIN_BUCKETS = (-2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def render(registry: CollectorRegistry) -> bytes:
    if multiprocess():
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(registry)


def _batch_size(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "endofuse_batch_size",
        "Requests per inference batch.",
        ["model"],
        buckets=BATCH_BUCKETS,
        registry=registry,
    )


def _queue_up(registry: CollectorRegistry) -> Gauge:
    return Gauge(
        "endofuse_queue_up",
        "1 while the request queue is reachable.",
        registry=registry,
        multiprocess_mode="livemin",
    )


def _per_version(name: str, documentation: str, registry: CollectorRegistry) -> Gauge:
    # Every API process sees the same shared queue: report the freshest live value, not a sum.
    return Gauge(
        name, documentation, ["model", "version"], registry=registry, multiprocess_mode="livemax"
    )


def _model_events(registry: CollectorRegistry) -> Counter:
    return Counter(
        "endofuse_model_events",
        "Model versions added or removed while serving (hot reload): loaded, failed (the "
        "directory did not check out or load; retried when it changes), removed.",
        ["model", "version", "event"],
        registry=registry,
    )


class ServingGauges:
    """How each loaded version runs: sessions, the batch limit in force, and the measured
    batch profile (service/batch_profile.py), per batch size."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = _per_version(
            "endofuse_engine_instances", "ONNX Runtime sessions per model version.", registry
        )
        self.max_batch = _per_version(
            "endofuse_max_batch_size", "Batch limit in force (measured, or configured).", registry
        )
        self.profile = Gauge(
            "endofuse_batch_profile_ms_per_image",
            "Measured at load: milliseconds per image at each batch size, every session busy.",
            ["model", "version", "batch_size"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.self_check = Gauge(
            "endofuse_model_self_check_difference",
            "At load: the largest difference between this host's outputs on the manifest's "
            "probe inputs and those recorded with the model (output=probabilities: absolute; "
            "output=ood_distance: relative). Above the tolerance the decision thresholds were "
            "fitted on other answers.",
            ["model", "version", "output"],
            registry=registry,
            multiprocess_mode="livemax",
        )

    def publish(self, registry: Any) -> None:
        """What ``registry`` (service.registry.Registry) runs: its versions (remote ones, with
        no engine, are skipped) and the self-check figures of those it refused."""
        for gauge in (self.instances, self.max_batch, self.profile, self.self_check):
            gauge.clear()
        for record in registry.refused.values():
            self._publish_check(record.name, record.version, record.check)
        for mv in registry.all():
            if mv.engine is None:
                continue
            self.instances.labels(mv.name, mv.version).set(mv.engine.size)
            if mv.engine.max_batch_size:
                self.max_batch.labels(mv.name, mv.version).set(mv.engine.max_batch_size)
            for point in mv.engine.profile.points if mv.engine.profile else ():
                self.profile.labels(mv.name, mv.version, str(point.batch_size)).set(
                    point.ms_per_image
                )
            self._publish_check(mv.name, mv.version, mv.engine.self_check)

    def _publish_check(self, name: str, version: str, check: Any) -> None:
        if check is None:
            return
        for output, value in (
            ("probabilities", check.max_probability_diff),
            ("ood_distance", check.max_ood_relative_diff),
        ):
            if value is not None:
                self.self_check.labels(name, version, output).set(value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "endofuse_requests",
            "Prediction requests by model and outcome (ok or an error code).",
            ["model", "outcome"],
            registry=r,
        )
        self.key_requests = Counter(
            "endofuse_key_requests",
            "Requests admitted with an API key, by key name (never the key).",
            ["key"],
            registry=r,
        )
        self.decisions = Counter(
            "endofuse_decisions",
            "Answered predictions that were referred to a clinician, and that were flagged "
            "out of distribution (a referral may have both reasons).",
            ["model", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "endofuse_request_seconds",
            "End-to-end prediction latency inside the service.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "endofuse_stage_seconds",
            "Latency per stage: decode (image + tabular), queue (waiting for a batch), "
            "inference (batch run), reply (worker to API, redis:// only).",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = _batch_size(r)
        self.queue_depth = _per_version(
            "endofuse_queue_depth", "Requests waiting for inference.", r
        )
        self.queue_pending = _per_version(
            "endofuse_queue_pending", "Entries delivered to a worker and not yet acknowledged.", r
        )
        self.queue_lag = _per_version(
            "endofuse_queue_lag", "Entries no worker has read yet (consumer-group lag).", r
        )
        self.workers = _per_version(
            "endofuse_workers", "Workers with a live heartbeat serving the model version.", r
        )
        self.queue_up = _queue_up(r)
        self.replies_dropped = Counter(
            "endofuse_replies_dropped",
            "Replies with no waiting request: duplicate, late (after the deadline), unknown "
            "or malformed.",
            ["reason"],
            registry=r,
        )
        self.enqueue_retries = Counter(
            "endofuse_queue_enqueue_retries",
            "Request writes to the queue tried again after a connection failed while the "
            "server was reachable (by the client library's error class).",
            ["error"],
            registry=r,
        )
        # What was answered, to watch the inputs drift (a new scope, another site's capture):
        # aggregates only, never a request's values.
        self.predicted = Counter(
            "endofuse_predictions",
            "Answers by the label given (the version's label rule).",
            ["model", "version", "label"],
            registry=r,
        )
        self.top_probability = Histogram(
            "endofuse_top_probability",
            "The largest calibrated probability of each answer.",
            ["model", "version"],
            buckets=TOP_PROBABILITY_BUCKETS,
            registry=r,
        )
        # The capture: a new capture card or processor shows as a new frame shape, whether
        # or not the model's answers move.
        self.frame_aspect = Histogram(
            "endofuse_input_aspect_ratio",
            "Width / height of each image answered, as sent (orientation applied).",
            ["model"],
            buckets=ASPECT_BUCKETS,
            registry=r,
        )
        self.frame_megapixels = Histogram(
            "endofuse_input_megapixels",
            "Size of each image answered, in megapixels, as sent.",
            ["model"],
            buckets=MEGAPIXEL_BUCKETS,
            registry=r,
        )
        self.ood_margin = Histogram(
            "endofuse_ood_margin",
            "Out-of-distribution score minus the version's threshold for the answer's input "
            "pattern (above 0: flagged), by pattern.",
            ["model", "version", "pattern"],
            buckets=OOD_MARGIN_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "endofuse_model_info",
            "Loaded model versions (value 1); default=true marks the default model's newest.",
            ["model", "version", "providers", "default"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            "endofuse_ready",
            "1 once models are loaded and warmed.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.model_events = _model_events(r)
        self.serving = ServingGauges(r)
        self.loop_lag = lag_histogram(r)
        self.queue_up.set(1)

    def observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def render(self) -> bytes:
        return render(self.registry)


class WorkerMetrics:
    """What an ``endofuse worker`` exposes on its own port."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.items = Counter(
            "endofuse_worker_items",
            "Queue entries handled, by outcome: ok, failed (error reply), expired (deadline "
            "passed before inference: dropped, never run), poison (could not be handled).",
            ["model", "outcome"],
            registry=r,
        )
        self.batch_size = _batch_size(r)
        self.model_events = _model_events(r)
        self.stage = Histogram(
            "endofuse_worker_stage_seconds",
            "Worker-side latency: queue (enqueued to batch start), inference, reply (writing "
            "replies and acknowledging).",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reclaimed = Counter(
            "endofuse_reclaimed",
            "Entries taken over from another consumer: reason departed (its heartbeat expired) "
            "or idle (delivered longer ago than the reclaim bound).",
            ["model", "reason"],
            registry=r,
        )
        self.reply_failures = Counter(
            "endofuse_worker_reply_failures",
            "Refused attempts to write replies and acknowledge their entries, by Redis error "
            "class; each is tried again a few times before the entries are left to redelivery.",
            ["model", "error"],
            registry=r,
        )
        self.dead_letters = Counter(
            "endofuse_dead_letters",
            "Entries moved to the dead-letter stream.",
            ["model"],
            registry=r,
        )
        self.queue_up = _queue_up(r)
        self.serving = ServingGauges(r)
        self.loop_lag = lag_histogram(r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
