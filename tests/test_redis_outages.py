"""Faults of Redis itself (restart, a connection cut off for longer than the client's
retries, data lost): real redis-server and worker processes. What was queued survives an
outage of the connection, and is answered; what Redis lost is answered 503 at once."""

from __future__ import annotations

import signal
import time

import pytest

from tests.redis_scenarios import (
    api_metric,
    check_all_answered,
    fire,
    post,
    queue_while_stopped,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_redis_restart_fails_fast_and_recovers(deploy, redis_server, slow_registry) -> None:
    client, _ = deploy(n_workers=1, timeout_s=3.0)
    assert post(client, 1).status_code == 200
    futures = fire(client, range(16))
    time.sleep(0.05)
    start = time.monotonic()
    redis_server.kill()
    for f in futures:
        r = f.result(timeout=10)
        assert r.status_code in (200, 503, 504), r.text
        assert time.monotonic() - start <= 3.0 + 1.0
    # While Redis is away the replica is not ready: a gateway stops routing to it.
    wait_for(lambda: client.get("/readyz").status_code == 503, 5, "readyz 503 without Redis")
    assert client.get("/readyz").json()["reason"] == "queue unreachable"
    redis_server.start()  # same port, empty (no persistence)
    restarted = time.monotonic()
    while post(client, 2).status_code != 200:
        assert time.monotonic() - restarted < 5.0, "did not recover within 5 s"
        time.sleep(0.1)
    wait_for(lambda: client.get("/readyz").status_code == 200, 5, "readyz 200 once Redis is back")


def test_connection_outage_past_the_client_retries_loses_nothing(
    deploy, redis_server, slow_registry
) -> None:
    """Redis stays up but refuses the API's and the worker's connections for several
    seconds, longer than the client library retries: the queued requests are still there,
    so they are answered once the connections are back, not failed."""
    client, (w,) = deploy(n_workers=1, timeout_s=30.0)
    futures = queue_while_stopped(client, range(6), [w], redis_server)
    admin = redis_server.client()  # connected before the door closes, and kept
    admin.ping()
    maxclients = admin.config_get("maxclients")["maxclients"]
    admin.config_set("maxclients", 1)  # new connections are refused from now on
    try:
        admin.client_kill_filter(_type="normal", skipme=True)
        # The replica noticed: its reply reader (or monitor) gave up retrying.
        wait_for(lambda: client.get("/readyz").status_code == 503, 20, "the API to lose Redis")
        assert client.get("/readyz").json()["reason"] == "queue unreachable"
        time.sleep(1.0)
        assert not any(f.done() for f in futures), [f.result().text for f in futures if f.done()]
    finally:
        admin.config_set("maxclients", maxclients)
    w.signal(signal.SIGCONT)
    check_all_answered(futures, range(6), slow_registry)


def test_queue_lost_with_redis_data_fails_waiting_requests_at_once(
    deploy, redis_server, slow_registry
) -> None:
    """Redis loses its data (as a restart without persistence does): the requests waiting on
    entries that are gone get 503 at once instead of waiting out their deadline."""
    client, (w,) = deploy(n_workers=1, timeout_s=30.0)
    futures = queue_while_stopped(client, range(6), [w], redis_server)
    start = time.monotonic()
    redis_server.client().flushall()
    for f in futures:
        r = f.result(timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable", r.text
    assert time.monotonic() - start < 5.0, "waited for the deadline instead of failing fast"
    w.signal(signal.SIGCONT)
    wait_for(lambda: post(client, 1).status_code == 200, 10, "the service to recover")


def api_connections(admin) -> list[dict]:
    return [c for c in admin.client_list(_type="normal") if c["name"].startswith("endofuse-api:")]


def test_connections_are_opened_at_start_and_none_at_run_time(
    deploy, redis_server, slow_registry
) -> None:
    """API and worker open their connections once, at start: a burst of concurrent
    requests needs no new one (a name lookup that stalls then cannot hold a request)."""
    client, _ = deploy(n_workers=1, timeout_s=15.0, queue_connections=6)
    admin = redis_server.client()
    wait_for(lambda: len(api_connections(admin)) == 6, 5, "the API's 6 connections")
    workers = [c for c in admin.client_list() if c["name"].startswith("endofuse-worker:")]
    assert len(workers) >= 6, workers
    opened = int(admin.info("stats")["total_connections_received"])
    futures = fire(client, range(24))
    check_all_answered(futures, range(24), slow_registry)
    assert int(admin.info("stats")["total_connections_received"]) == opened
    assert len(api_connections(admin)) == 6


def test_new_connections_refused_while_the_server_is_up_loses_nothing(
    deploy, redis_server, slow_registry
) -> None:
    """Redis is up and the API's reply reader keeps its connection, but the API's other
    connections are cut and new ones fail for longer than the client library's retries (as
    a name lookup does while the container network is reconfigured): the requests try
    again within their deadline and are answered, not refused."""
    client, _ = deploy(n_workers=1, timeout_s=15.0)
    assert post(client, 0).status_code == 200
    admin = redis_server.client()
    # Every connection of the API but its reply reader's own.
    cut = [c for c in api_connections(admin) if not c["name"].endswith(":replies")]
    assert cut, api_connections(admin)
    maxclients = admin.config_get("maxclients")["maxclients"]
    connected = int(admin.info("clients")["connected_clients"])
    admin.config_set("maxclients", connected - len(cut))  # no room once they are gone
    try:
        for c in cut:
            admin.client_kill_filter(_id=c["id"])
        futures = fire(client, range(10, 14))
        time.sleep(3.0)  # past the client library's own retries (about 2 s)
        assert not any(f.done() for f in futures), [f.result().text for f in futures if f.done()]
    finally:
        admin.config_set("maxclients", maxclients)
    check_all_answered(futures, range(10, 14), slow_registry)
    assert api_metric(client, "endofuse_queue_enqueue_retries_total") > 0
