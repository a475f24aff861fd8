"""The flush loop (``worker/flush.py``) against a real Redis and the sandbox over a real socket."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.polling import wait_until
from worker.embedded import start_private
from worker.flush import Flusher
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings


def _rig(redis_url: str, prefix: str, sandbox: SandboxServer,
         **env: str) -> tuple[Producer, Flusher, list[float]]:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_BASE_URL": sandbox.url, **env})
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    sleeps: list[float] = []
    flusher = Flusher(settings, producer.store, wake=lambda wakes: None, sleep=sleeps.append)
    return producer, flusher, sleeps


def redis_ms(client: redis.Redis) -> int:
    """Redis's clock (what the scripts read), in ms: readings around a call bound what it saw."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _intents(n: int) -> list[dict[str, object]]:
    return [{"operator_type": 4, "token": f"tok-{k:036d}"} for k in range(n)]


def test_a_shared_backoff_read_with_the_claim_holds_the_call(
        redis_url: str, prefix: str, sandbox: SandboxServer) -> None:
    producer, flusher, sleeps = _rig(redis_url, prefix, sandbox)
    try:
        ids = producer.submit_many(_intents(20))
        started = redis_ms(producer.store.redis)
        producer.store.set_backoff("default", 20.0)
        result = flusher.flush("default", 4)
        elapsed_s = (redis_ms(producer.store.redis) - started) / 1000
        assert result.batches == 1 and result.items == 20
        # the rest of the backoff when the claim read it (Redis's clock bounds when that was)
        assert len(sleeps) == 1 and 20.0 - elapsed_s - 0.001 <= sleeps[0] <= 20.0, sleeps
        assert sandbox.stats()["calls"] == 1
        assert {s.state for s in producer.statuses([i for i in ids if i])} == {"succeeded"}
    finally:
        flusher.close()
        producer.close()


def test_without_a_backoff_the_call_goes_at_once(
        redis_url: str, prefix: str, sandbox: SandboxServer) -> None:
    producer, flusher, sleeps = _rig(redis_url, prefix, sandbox)
    try:
        producer.submit_many(_intents(40))
        result = flusher.flush("default", 4)
        assert (result.batches, result.items, result.stopped) == (2, 40, "empty")
        assert sleeps == []
    finally:
        flusher.close()
        producer.close()


def test_with_a_rate_limit_every_call_reserves_its_slot(
        redis_url: str, prefix: str, sandbox: SandboxServer) -> None:
    # one call per 10 s: the first call goes at once, the second waits for the next slot, less
    # the time the first took (Redis's clock bounds it, however slow the machine is)
    producer, flusher, sleeps = _rig(redis_url, prefix, sandbox, TPNS_MAX_CALLS_PER_S="0.1")
    try:
        producer.submit_many(_intents(40))
        started = redis_ms(producer.store.redis)
        result = flusher.flush("default", 4)
        elapsed_s = (redis_ms(producer.store.redis) - started) / 1000
        assert result.batches == 2 and sandbox.stats()["calls"] == 2
        assert len(sleeps) == 1 and 10.0 - elapsed_s <= sleeps[0] <= 10.0, sleeps
    finally:
        flusher.close()
        producer.close()


def test_the_claim_survives_a_server_that_lost_its_scripts(
        tmp_path: Path, prefix: str, sandbox: SandboxServer) -> None:
    # a private server: flushing the script cache of a shared one would touch what is not ours
    proc, url = start_private(tmp_path / "redis")
    producer, flusher, _ = _rig(url, prefix, sandbox)
    try:
        producer.submit_many(_intents(20))
        client = redis.Redis.from_url(url)
        client.script_flush()
        client.close()
        assert flusher.flush("default", 4).items == 20
    finally:
        flusher.close()
        producer.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_no_call_starts_that_could_outlive_the_batch_lease(
        redis_url: str, prefix: str, sandbox: SandboxServer) -> None:
    # lease 8 s, timeout 1 s: an attempt may start until 8 - (2 x 1 + 0.8) = 5.2 s after the claim
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix, "TPNS_BASE_URL": sandbox.url,
                                  "TPNS_LEASE_S": "8", "TPNS_HTTP_TIMEOUT_S": "1", "TPNS_LINGER_MS": "0"})
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    now = [1000.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # a fake clock: sleeping moves it, nothing waits
        sleeps.append(seconds)
        now[0] += seconds

    flusher = Flusher(settings, producer.store, wake=lambda wakes: None, sleep=sleep, monotonic=lambda: now[0])
    try:
        ids = [i for i in producer.submit_many(_intents(3)) if i]
        producer.store.set_backoff("default", 20.0)  # a 429's Retry-After longer than the lease
        result = flusher.flush("default", 4)
        assert result.batches == 1, result
        assert sleeps and abs(sum(sleeps) - 5.2) < 0.01, sleeps  # waited only while a call could still fit
        assert sandbox.stats()["calls"] == 0, "a call started that could still run when the lease ends"
        statuses = producer.statuses(ids)
        assert {(s.state, s.error) for s in statuses if s} == {("retrying", "lease_spent")}
    finally:
        flusher.close()
        producer.close()


def test_settings_keep_the_lease_longer_than_a_call() -> None:
    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match=r"TPNS_LEASE_S: must be at least 4 x TPNS_HTTP_TIMEOUT_S \(40\)"):
        Settings.from_env({"TPNS_LEASE_S": "30"})


def _failing_rig(redis_url: str, prefix: str, sandbox: SandboxServer,
                 between: object) -> tuple[Producer, Flusher, list[float]]:
    """Every call fails with HTTP 503 (tenacity retries it); ``between()`` runs in the wait
    before each retry, i.e. between two HTTP attempts of one batch."""
    sandbox.configure(fault_rate=1.0, faults=["http_503"])
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_BASE_URL": sandbox.url, "TPNS_LEASE_S": "8",
                                  "TPNS_HTTP_TIMEOUT_S": "1", "TPNS_LINGER_MS": "0"})
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    now = [1000.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # a fake clock: sleeping moves it, nothing waits
        sleeps.append(seconds)
        now[0] += seconds
        between()  # type: ignore[operator]

    flusher = Flusher(settings, producer.store, wake=lambda wakes: None, sleep=sleep,
                      monotonic=lambda: now[0])
    return producer, flusher, sleeps


def test_no_retry_goes_out_once_the_lease_is_gone(
        redis_url: str, prefix: str, sandbox: SandboxServer) -> None:
    client = redis.Redis.from_url(redis_url)

    def lose_the_lease() -> None:  # as a restart from an AOF without the claim would
        client.delete(f"{prefix}leases")

    producer, flusher, _ = _failing_rig(redis_url, prefix, sandbox, lose_the_lease)
    try:
        ids = [i for i in producer.submit_many(_intents(3)) if i]
        assert flusher.flush("default", 4).batches == 1
        assert sandbox.stats()["calls"] == 1, "an attempt went out without a live lease"
        statuses = producer.statuses(ids)
        assert {(s.state, s.error) for s in statuses if s} == {("retrying", "lease_unconfirmed")}
    finally:
        client.close()
        flusher.close()
        producer.close()


def test_no_retry_goes_out_while_redis_is_unreachable(
        tmp_path: Path, prefix: str, sandbox: SandboxServer) -> None:
    proc, url = start_private(tmp_path / "redis")  # a server of our own, to kill

    def kill_redis() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    producer, flusher, sleeps = _failing_rig(url, prefix, sandbox, kill_redis)
    try:
        producer.submit_many(_intents(3))
        with pytest.raises(redis.ConnectionError):
            flusher.flush("default", 4)
        assert sandbox.stats()["calls"] == 1, "an attempt went out while Redis was unreachable"
        # the outcome was then tried again for the lease's length, every 0.25 s, before the
        # error went up (the items come back with the lease when Redis does)
        assert sleeps[1:] and set(sleeps[1:]) == {0.25} and 7 < sum(sleeps[1:]) <= 8
    finally:
        flusher.close()
        producer.close()
        kill_redis()


def test_each_batch_line_says_what_its_claim_saw(
        redis_url: str, prefix: str, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture) -> None:
    producer, flusher, _ = _rig(redis_url, prefix, sandbox, TPNS_LINGER_MS="0")
    caplog.set_level(logging.INFO, logger="worker.flush")
    try:
        producer.submit_many(_intents(25))
        assert flusher.flush("default", 4).items == 25
    finally:
        flusher.close()
        producer.close()
    lines = [r for r in caplog.records if r.name == "worker.flush" and hasattr(r, "eligible")]
    # the two calls were in flight together, so their lines come in any order: claim order is
    # the batch id's sequence number
    lines.sort(key=lambda r: int(r.batch_id[1:].split(".")[0]))  # type: ignore[attr-defined]
    seen = [(r.items, r.eligible, r.reason) for r in lines]  # type: ignore[attr-defined]
    assert seen == [(20, 25, "full"), (5, 5, "linger")]
    assert "(full: 25 eligible, oldest " in lines[0].getMessage()


def test_a_flush_started_during_a_shutdown_claims_nothing(
        redis_url: str, prefix: str, sandbox: SandboxServer) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_BASE_URL": sandbox.url})
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    flusher = Flusher(settings, producer.store, wake=lambda wakes: None, should_stop=lambda: True)
    try:
        ids = [i for i in producer.submit_many(_intents(20)) if i]
        result = flusher.flush("default", 4)
        assert (result.batches, result.stopped) == (0, "shutdown")
        assert sandbox.stats()["calls"] == 0
        assert {s.state for s in producer.statuses(ids) if s} == {"queued"}
    finally:
        flusher.close()
        producer.close()


def test_one_process_keeps_max_in_flight_calls_in_flight_on_a_pool_sized_to_them(
        redis_url: str, prefix: str, sandbox: SandboxServer,
        caplog: pytest.LogCaptureFixture) -> None:
    # 16 slots: more than requests' default pool of 10 connections, so a pool left at its
    # default would drop connections (urllib3 warns "Connection pool is full")
    producer, flusher, _ = _rig(redis_url, prefix, sandbox, TPNS_MAX_IN_FLIGHT="16",
                                TPNS_LINGER_MS="0")
    caplog.set_level(logging.WARNING, logger="urllib3")
    results: list[Any] = []
    try:
        ids = [i for i in producer.submit_many(_intents(20 * 24)) if i]
        sandbox.hold()
        flushing = threading.Thread(target=lambda: results.append(flusher.flush("default", 4)))
        flushing.start()
        try:
            wait_until(lambda: sandbox.stats()["in_flight"] == 16)
            # every slot is taken: the flush waits for one before it claims again
            assert producer.stats()["in_flight"] == 16 * 20
        finally:
            sandbox.release()
        flushing.join(30)
        assert not flushing.is_alive()
        assert results[0].batches == 24 and results[0].items == 24 * 20
        assert sandbox.stats()["in_flight_max"] == 16
        assert {s.state for s in producer.statuses(ids) if s} == {"succeeded"}
    finally:
        flusher.close()
        producer.close()
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
