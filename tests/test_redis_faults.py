"""Fault tests for the Redis deployment: real redis-server, real worker processes, real
signals. Each scenario checks that no request is lost, none is answered twice, and that the
service says 503/504 instead of hanging. Faults of Redis itself: tests/test_redis_outages.py."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.queue.wire import Streams
from tests.conftest import make_settings
from tests.redis_harness import WorkerProcess
from tests.redis_scenarios import (
    GROUP,
    STREAM,
    api_metric,
    check_all_answered,
    consumer_pending,
    fire,
    post,
    queue_while_stopped,
    stop_mid_batch,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_kill_9_mid_batch_loses_nothing(deploy, redis_server, slow_registry) -> None:
    # An idle bound past every deadline: A's entries can only be answered by being taken
    # over once A's heartbeat has expired.
    client, (a, b) = deploy(n_workers=2, reclaim_idle_ms=60_000)
    b.signal(signal.SIGSTOP)  # A reads the requests and surely holds a batch (as below)
    futures = fire(client, range(40))
    stop_mid_batch(a, redis_server)
    a.signal(signal.SIGKILL)
    b.signal(signal.SIGCONT)
    check_all_answered(futures, range(40), slow_registry)
    # A's unacknowledged entries are taken over (answered again if A had already replied:
    # the API drops those duplicates) and nothing is left behind.
    departed = 'endofuse_reclaimed_total{model="slow",reason="departed"}'
    wait_for(lambda: b.metric(departed) > 0, 10, "B to take over")
    wait_for(lambda: redis_server.client().xlen(STREAM) == 0, 10, "an empty stream")


def test_departed_consumer_is_taken_over_then_forgotten(deploy, redis_server, slow_registry):
    """Entries held by a consumer without a heartbeat are claimed long before the idle
    bound; once it holds nothing and has been silent for ``forget_consumer_s`` it is
    deleted from the group, while the live worker's consumer stays."""
    client, (w,) = deploy(n_workers=1, reclaim_idle_ms=60_000, forget_consumer_s=1.0)
    futures = queue_while_stopped(client, range(10), [w], redis_server)
    r = redis_server.client()
    ((_, held),) = r.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=4)
    assert len(held) == 4
    w.signal(signal.SIGCONT)
    check_all_answered(futures, range(10), slow_registry)
    assert w.metric('endofuse_reclaimed_total{model="slow",reason="departed"}') == 4
    assert w.metric('endofuse_reclaimed_total{model="slow",reason="idle"}') == 0
    # Logged at the claim with how long the entries had waited since their delivery (the
    # field must survive the log whitelist); the worker's loop was watched meanwhile.
    took = [
        json.loads(line)
        for line in Path(w.log.name).read_text().splitlines()
        if "took over a departed worker's entries" in line
    ]
    assert sum(t["entries"] for t in took) == 4, took
    assert all(t["consumer"] == "ghost" and t["waited_ms"] >= 0 for t in took), took
    assert w.metric("endofuse_event_loop_lag_seconds_count") > 0

    def names() -> set[str]:
        return {c["name"].decode() for c in r.xinfo_consumers(STREAM, GROUP)}

    wait_for(lambda: "ghost" not in names(), 10, "the departed consumer to be forgotten")
    assert any(f":{w.proc.pid}:" in n for n in names()), names()
    assert r.xlen(STREAM) == 0


def test_stopped_worker_late_replies_are_ignored(deploy, redis_server, slow_registry) -> None:
    client, (a, b) = deploy(n_workers=2, reclaim_idle_ms=800)
    # B paused while the requests arrive: A reads them, so A surely holds a batch to be
    # stopped in (with both reading, a busy machine could let B read all 24 first).
    b.signal(signal.SIGSTOP)
    futures = fire(client, range(24))
    stop_mid_batch(a, redis_server)
    b.signal(signal.SIGCONT)
    check_all_answered(futures, range(24), slow_registry)
    wait_for(lambda: b.metric("endofuse_reclaimed_total") > 0, 10, "B to take over")
    a.signal(signal.SIGCONT)

    def extra_replies_all_dropped() -> bool:
        sent = sum(
            w.metric('endofuse_worker_items_total{model="slow",outcome="ok"}') for w in (a, b)
        )
        return sent - 24 == api_metric(client, "endofuse_replies_dropped_total")

    # Whatever A sends once it wakes up reaches no client: every reply beyond the 24 answers
    # is counted as dropped by the API.
    wait_for(lambda: redis_server.client().xlen(STREAM) == 0, 10, "an empty stream")
    wait_for(extra_replies_all_dropped, 10, "the late replies to be dropped")


def test_poison_entry_is_dead_lettered_after_3_deliveries(deploy, redis_server, slow_registry):
    client, (w,) = deploy(n_workers=1, reclaim_idle_ms=300)
    r = redis_server.client()
    reply = "test:replies"
    poison = {
        "id": "poison-1", "model": "slow:1", "reply": reply, "deadline": repr(time.time() + 60),
        "shape": "128,128,3", "image": b"\x00" * 17, "image_present": "1",
    }  # fmt: skip
    r.xadd(STREAM, poison)
    futures = fire(client, range(12))
    check_all_answered(futures, range(12), slow_registry)  # neighbours unaffected
    wait_for(lambda: r.xlen(Streams().dead_letters) == 1, 15, "the dead letter")
    ((_, letter),) = r.xrange(Streams().dead_letters)
    assert letter[b"deliveries"] == b"3" and letter[b"id"] == b"poison-1"
    assert b"image" not in letter and b"shape" not in letter, "metadata only"
    ((_, answer),) = r.xrange(reply)
    assert answer[b"status"] == b"error" and answer[b"code"] == b"dead_lettered"
    assert w.metric("endofuse_dead_letters_total") == 1
    assert r.xlen(STREAM) == 0


def test_all_workers_down_gives_503_or_504_in_time(deploy) -> None:
    client, (w,) = deploy(n_workers=1, timeout_s=2.0)
    w.signal(signal.SIGKILL)
    for _ in range(2):  # before and after the heartbeat has expired
        start = time.monotonic()
        futures = fire(client, range(6))
        for f in futures:
            r = f.result(timeout=10)
            assert r.status_code in (503, 504), r.text
            assert time.monotonic() - start <= 2.0 + 1.0
        time.sleep(1.5)
    # The heartbeat has expired: the replica says so, and a request waits for a worker up to
    # its deadline (a restart may be under way), then gets 503.
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["reason"] == "no live worker for slow:1"
    start = time.monotonic()
    r = post(client, 0)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert 2.0 - 0.2 <= time.monotonic() - start <= 2.0 + 1.0


def test_api_started_with_its_workers_answers_every_request(redis_server, slow_models) -> None:
    """API replica and worker start together and requests arrive at once: no 503 window. The
    replica reports ready only once the worker's heartbeat is in, and the early requests wait
    for it instead of failing."""
    api = make_settings(
        slow_models,
        queue_url=redis_server.url,
        request_timeout_s=30.0,
        latency_budget_s=0,
        heartbeat_s=0.3,
    )
    worker = WorkerProcess(redis_server.url, slow_models, heartbeat_s=0.3)
    try:
        with TestClient(create_app(api), raise_server_exceptions=False) as client:
            early = client.get("/readyz")
            futures = fire(client, range(24))
            assert early.status_code == 503, early.text
            assert early.json()["workers"] == {"slow:1": 0}
            codes = [f.result(timeout=60).status_code for f in futures]
            assert codes == [200] * 24, codes
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["workers"] == {"slow:1": 1}
            assert client.get("/v2/health/ready").status_code == 200
            assert client.get("/v2/models/slow/ready").status_code == 200
    finally:
        worker.stop()


def test_readiness_without_worker_requirement(redis_server, slow_models) -> None:
    api = make_settings(slow_models, queue_url=redis_server.url, ready_workers="none")
    with TestClient(create_app(api), raise_server_exceptions=False) as client:
        time.sleep(0.3)
        body = client.get("/readyz").json()
        assert body["status"] == "ready" and body["workers"] == {"slow:1": 0}
        # The protocol's per-model readiness still tells the truth.
        assert client.get("/v2/models/slow/ready").status_code == 503
    other = make_settings(slow_models, queue_url=redis_server.url, ready_workers="other")
    with TestClient(create_app(other), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200  # "slow" is not required


def test_backlog_past_its_deadline_is_never_run(deploy, redis_server) -> None:
    client, (w,) = deploy(n_workers=1, timeout_s=1.0, max_queue_size=6)
    w.signal(signal.SIGSTOP)
    futures = fire(client, range(10))
    codes = sorted(f.result(timeout=10).status_code for f in futures)
    assert codes == [503] * 4 + [504] * 6, codes  # 6 queued (then expired), 4 refused: full
    w.signal(signal.SIGCONT)
    wait_for(lambda: redis_server.client().xlen(STREAM) == 0, 10, "the backlog to be dropped")
    assert w.metric('endofuse_worker_items_total{model="slow",outcome="expired"}') == 6
    assert w.metric('endofuse_worker_items_total{model="slow",outcome="ok"}') == 0


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_worker_reads_ahead_of_its_sessions(deploy, redis_server, slow_registry, read_ahead):
    """With one session and ``worker_read_ahead`` = 2 the worker holds up to 3 entries (one
    running, two in hand for when it ends); with 0 it holds only the one running (and,
    for a moment, one whose reply is on its way). Every answer is still its own."""
    client, (w,) = deploy(
        n_workers=1,
        engine_instances=1,
        solo_session=False,
        profile_batches=False,
        max_batch_size=1,
        worker_read_ahead=read_ahead,
    )
    futures = queue_while_stopped(client, range(12), [w], redis_server)
    w.signal(signal.SIGCONT)
    held = []
    deadline = time.monotonic() + 60
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        held.append(consumer_pending(redis_server, w.proc.pid))
    check_all_answered(futures, range(12), slow_registry)
    if read_ahead:
        assert max(held) >= 1 + read_ahead, held
    else:
        assert max(held) <= 2, held


def test_stopping_worker_runs_what_it_read_ahead(deploy, redis_server, slow_registry) -> None:
    """SIGTERM while batches wait in a worker's hands: it runs them before it exits, so
    none is left pending for another worker to reclaim after the idle timeout."""
    client, (a, b) = deploy(
        n_workers=2, engine_instances=1, solo_session=False, profile_batches=False,
        max_batch_size=1, worker_read_ahead=2, reclaim_idle_ms=5000,
    )  # fmt: skip
    futures = queue_while_stopped(client, range(8), [a, b], redis_server)
    a.signal(signal.SIGCONT)  # A reads first
    wait_for(lambda: consumer_pending(redis_server, a.proc.pid) >= 3, 20, "A to read ahead")
    a.signal(signal.SIGTERM)
    b.signal(signal.SIGCONT)
    a.proc.wait(20)
    check_all_answered(futures, range(8), slow_registry)
    assert consumer_pending(redis_server, a.proc.pid) == 0
    assert b.metric("endofuse_reclaimed_total") == 0


def test_refused_reply_is_tried_again_not_left_to_redelivery(deploy, redis_server, slow_registry):
    """A refused reply/acknowledge (here XACK denied by an ACL rule, so Redis aborts the whole
    MULTI and writes nothing) is tried again in place: once Redis accepts it, the requests are
    answered, long before the reclaim bound (60 s, past every deadline) would redeliver them."""
    client, (w,) = deploy(n_workers=1, reclaim_idle_ms=60_000, timeout_s=10)
    r = redis_server.client()
    r.execute_command("ACL", "SETUSER", "default", "-xack")
    try:
        futures = fire(client, range(6))
        refused = "endofuse_worker_reply_failures_total"
        wait_for(lambda: w.metric(refused) > 0, 15, "a refused reply")
    finally:
        r.execute_command("ACL", "SETUSER", "default", "+xack")
    check_all_answered(futures, range(6), slow_registry)
    wait_for(lambda: r.xlen(STREAM) == 0, 10, "an empty stream")
    assert r.xpending(STREAM, GROUP)["pending"] == 0
