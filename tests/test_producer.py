"""The producer when Redis cannot answer (SPEC §3.7, §3.8): one typed error naming the fate of
every id, back-pressure, and nothing half-written — against real redis-servers the tests kill,
fill up, or reach through a relay that loses replies."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.redis_faults import RedisProcess, ReplyLosingRelay, private_redis
from worker.errors import QueueFullError, StoreUnavailableError, TpnsBatcherError
from worker.producer import Producer
from worker.settings import Settings
from worker.store import Store
from worker.tools.drill import free_port
from worker.tools.memory import complete_all

PASSWORD = "s3cret-redis-pw"


def make_producer(url: str, prefix: str = "tpnstest:p:", **env: str) -> Producer:
    settings = Settings.from_env({"REDIS_URL": url, "TPNS_REDIS_PREFIX": prefix, **env})
    return Producer(url, prefix, settings=settings, wake=lambda wakes: None)


def op4(k: int, **extra: Any) -> dict[str, Any]:
    return {"operator_type": 4, "token": f"tok-{k}", **extra}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    with private_redis(tmp_path / "redis") as srv:
        yield srv


def check_consistent(client: redis.Redis, prefix: str) -> dict[str, dict[str, Any]]:
    """Every structure under ``prefix`` agrees with the records: counters, ready lists, chains
    and the key index. Returns the records by id."""
    records = {k[len(prefix) + 2:]: json.loads(client.get(k))  # type: ignore[arg-type]
               for k in set(client.scan_iter(match=f"{prefix}i:*", count=1000))}
    counters = {k: int(v) for k, v in client.hgetall(f"{prefix}n").items()}  # type: ignore[union-attr]
    pending = [r for r in records.values() if r["s"] in ("q", "s", "r")]
    assert sum(v for k, v in counters.items() if k.startswith("queued:")) == \
        sum(1 for r in pending if r["s"] == "q"), (counters, len(records))
    assert sum(v for k, v in counters.items() if k.startswith("enqueued:")) == len(records)
    ready: list[str] = []
    for key in set(client.scan_iter(match=f"{prefix}q:*")):
        ready += client.lrange(key, 0, -1)  # type: ignore[operator]
    assert len(ready) == len(set(ready)), "an id is twice in a ready list"
    assert set(ready) <= set(records), "a ready list names an id with no record"
    waiters = [w for r in records.values() for w in r.get("w", [])]
    assert set(waiters) <= set(records), "a chain names an id with no record"
    for intent_id, rec in records.items():
        if rec["s"] == "q":  # queued: either ready, or waiting on as many predecessors as say so
            assert (intent_id in ready) != bool(rec.get("d")), (intent_id, rec)
            assert waiters.count(intent_id) == rec.get("d", 0), (intent_id, rec)
    for key in set(client.scan_iter(match=f"{prefix}ko:*")):
        holders = client.hvals(key)
        assert set(holders) <= set(records), "the key index names an id with no record"  # type: ignore[arg-type]
    return records


# -- Redis unreachable --------------------------------------------------------------------------

def test_a_killed_redis_is_one_typed_error_and_every_id_is_reported_not_stored(
        tmp_path: Path) -> None:
    with private_redis(tmp_path / "redis", password=PASSWORD) as server:
        check_killed_redis(server)


def check_killed_redis(server: RedisProcess) -> None:
    producer = make_producer(server.url)
    try:
        first = producer.submit(op4(0))  # the producer knows the apps: ids are assigned
        server.kill()
        with pytest.raises(StoreUnavailableError) as caught:
            producer.submit_many([op4(1), op4(2, id="given-2"), {"operator_type": 9}])
        exc = caught.value
        assert type(exc) is StoreUnavailableError and exc.code == "store_unavailable"
        assert exc.stored == [] and exc.in_doubt == []
        assert len(exc.refused) == 2 and "given-2" in exc.refused  # the invalid one has no id
        assert exc.result is not None and exc.result.ids == [None, None, None]  # type: ignore[attr-defined]
        assert 2 in exc.result.errors  # type: ignore[attr-defined]  # still refused by the rules
        message = str(exc)
        assert PASSWORD not in message and "***" in message
        assert f"127.0.0.1:{server.port}" in message and "ConnectionError" in message
        assert "\n" not in message
        for call in (lambda: producer.status(first), lambda: producer.statuses([first]),
                     lambda: producer.wait([first], timeout_s=1), producer.stats,
                     producer.requeue_failed, lambda: producer.submit(op4(3))):
            with pytest.raises(StoreUnavailableError) as again:
                call()
            assert PASSWORD not in str(again.value)
            assert not isinstance(again.value, redis.RedisError)
        server.start()  # same port, same AOF: the same producer works again
        assert producer.status(first).state == "queued"  # type: ignore[union-attr]
        # the restarted server lost its scripts: the enqueue loads them and goes on
        again = [producer.submit(op4(1)), *producer.submit_many([op4(4), op4(5)])]
        assert all(isinstance(i, str) for i in again), again
        assert [s.state for s in producer.statuses(again)] == ["queued"] * 3  # type: ignore[union-attr]
    finally:
        producer.close()


def test_a_fresh_producer_with_redis_down_names_the_given_ids(tmp_path: Path) -> None:
    producer = make_producer(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            producer.enqueue([op4(1, id="a-1"), op4(2)])
        assert caught.value.refused == ["a-1"]  # the other one was never even read
        assert caught.value.result.not_stored == {0: "a-1", 1: None}  # type: ignore[attr-defined]
        assert isinstance(caught.value, TpnsBatcherError)
    finally:
        producer.close()


def test_a_lost_reply_is_in_doubt_and_the_retried_enqueue_stored_each_intent_once(
        server: RedisProcess) -> None:
    """The relay loses the reply of every script call after Redis ran it; redis-py re-sends the
    call a few times (each runs again), then gives up: the ids are in doubt, and Redis holds
    each intent exactly once — enqueue is idempotent by the client-assigned id."""
    prefix = "tpnstest:doubt:"
    intents = [op4(k) for k in range(5)] + [{"operator_type": 2, "token": "tok-0",
                                             "account_list": [{"account": "u"}]}]
    with ReplyLosingRelay(server.port) as relay:
        producer = make_producer(relay.url, prefix)
        try:
            relay.losing = False
            first = producer.submit(op4(99))  # Redis has the script now: a lost reply is of a run
            relay.losing = True
            with pytest.raises(StoreUnavailableError) as caught:
                producer.submit_many(intents)
        finally:
            producer.close()
    exc = caught.value
    assert relay.calls_lost >= 2, "redis-py did not re-send the call"
    assert exc.stored == [] and exc.refused == [] and len(exc.in_doubt) == 6
    assert f"127.0.0.1:{relay.port}" in str(exc)
    records = check_consistent(server.client(), prefix)
    assert set(records) == {first, *exc.in_doubt}, "an in-doubt id cannot be looked up"
    counters = server.client().hgetall(f"{prefix}n")
    assert counters["enqueued:4"] == "6" and counters["enqueued:2"] == "1"
    # the later intent on tok-0 waits for the earlier one, once
    assert records[exc.in_doubt[5]]["d"] == 1


def test_an_intent_compacted_before_its_lost_reply_is_resent_is_not_stored_twice(
        server: RedisProcess) -> None:
    """The relay holds back the reply of the enqueue. Before the producer sends the call again,
    the intent is claimed and succeeds, and with ``TPNS_STATUS_DETAIL_S=0`` only its summary is
    left. The re-sent call looks its (generated) ids up among the summaries too, so the intent is
    not stored again: a second copy would be sent again, after any later intent on its keys."""
    prefix = "tpnstest:resend:"
    store = Store(server.client(), prefix, linger_ms=0, status_detail_s=0)
    completed: list[int] = []

    def succeed_meanwhile() -> None:
        relay.losing = False  # the re-send goes through
        completed.append(complete_all(store, 4))

    with ReplyLosingRelay(server.port) as relay:
        producer = make_producer(relay.url, prefix, TPNS_STATUS_DETAIL_S="0", TPNS_LINGER_MS="0")
        try:
            relay.losing = False
            producer.submit({"operator_type": 5, "account": "warm"})  # Redis has the script now
            relay.losing = True
            relay.on_lost = succeed_meanwhile
            stored = producer.submit(op4(1))
        finally:
            producer.close()
    assert relay.calls_lost == 1 and completed == [1]
    client = server.client()
    assert client.get(f"{prefix}i:{stored}") is None, "stored again by the re-send"
    counters = client.hgetall(f"{prefix}n")
    assert counters["enqueued:4"] == "1" and counters.get("queued:4", "0") == "0", counters
    assert client.llen(store.keys.ready("default", 4)) == 0
    status = store.status(stored)
    assert status is not None and status.state == "succeeded" and status.detail == "compacted"


# -- back-pressure ------------------------------------------------------------------------------

def test_max_pending_refuses_new_intents_with_queue_full(redis_url: str, prefix: str,
                                                         rconn: redis.Redis) -> None:
    producer = make_producer(redis_url, prefix, TPNS_MAX_PENDING="5")
    try:
        kept = producer.submit(op4(0, id="kept"))
        with pytest.raises(QueueFullError) as caught:
            producer.submit_many([op4(k) for k in range(1, 9)])
        exc = caught.value
        assert exc.code == "queue_full" and "TPNS_MAX_PENDING (5)" in str(exc)
        assert len(exc.stored) == 4 and len(exc.refused) == 4 and exc.in_doubt == []
        assert exc.retry_after_s > 0
        records = check_consistent(rconn, prefix)
        assert set(records) == {kept, *exc.stored}
        assert not set(exc.refused) & set(records)
        # an id already stored is answered as stored even when full (a re-send is safe)
        assert producer.submit(op4(0, id="kept")) == "kept"
        with pytest.raises(QueueFullError):
            producer.submit(op4(99))
        # as the workers drain, room comes back
        rconn.hincrby(f"{prefix}n", "queued:4", -1)  # as if one intent had gone terminal
        assert producer.submit(op4(100)) is not None
    finally:
        producer.close()


def test_max_pending_zero_is_unlimited(redis_url: str, prefix: str) -> None:
    producer = make_producer(redis_url, prefix, TPNS_MAX_PENDING="0")
    try:
        assert None not in producer.submit_many([op4(k) for k in range(30)])
    finally:
        producer.close()


def test_redis_out_of_memory_is_queue_full_and_nothing_is_half_written(
        server: RedisProcess) -> None:
    prefix = "tpnstest:oom:"
    admin = server.client()
    used = int(admin.info("memory")["used_memory"])  # type: ignore[index]
    admin.config_set("maxmemory", used + 400_000)
    producer = make_producer(server.url, prefix, TPNS_LINGER_MS="0")
    stored: list[str] = []
    try:
        caught = None
        for round_ in range(200):  # tokens shared across rounds make chains, too
            batch = [{"operator_type": 2, "token": f"t{(round_ * 300 + k) % 700}-" + "x" * 40,
                      "account_list": [{"account": f"user-{k}@example.com"}]} for k in range(300)]
            try:
                stored += [i for i in producer.submit_many(batch) if i]
            except QueueFullError as exc:
                caught = exc
                break
        assert caught is not None, "Redis never ran out of memory"
        assert "out of memory" in str(caught) and "OOM" in str(caught)
        assert caught.in_doubt == [] and len(caught.refused) > 0
        stored += caught.stored
        records = check_consistent(admin, prefix)
        assert set(records) == set(stored), "a refused intent left a record, or a stored one is missing"
        assert not set(caught.refused) & set(records)
        # reads still work while full, and workers keep draining: claim and complete are not
        # refused, so what was accepted still reaches TPNS
        assert producer.status(stored[0]) is not None
        claim = producer.store.claim("default", 2)
        assert claim.kind == "batch" and len(claim.items) == 20
        done = producer.store.complete(claim.batch_id or "", [
            {"id": item.id, "state": "succeeded"} for item in claim.items],
            calls=1, items_sent=20, operator_type=2)
        assert done.applied == 20
        assert producer.store.reap() == (0, ())
        check_consistent(admin, prefix)
        # with room again, enqueues are taken
        admin.config_set("maxmemory", 0)
        assert producer.submit(op4(1)) is not None
        check_consistent(admin, prefix)
    finally:
        producer.close()


# -- the broker ------------------------------------------------------------------------------------

def test_a_dead_broker_is_not_an_error_and_is_logged_once(
        redis_url: str, prefix: str, rconn: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_LINGER_MS": "0",
                                  "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    producer = Producer(redis_url, prefix, settings=settings)  # real Celery wakes
    try:
        with caplog.at_level(logging.WARNING, logger="worker.producer"):
            ids = [producer.submit({"operator_type": 4, "token": f"t{k}"}) for k in range(3)]
        assert [s.state for s in producer.statuses(ids)] == ["queued"] * 3  # type: ignore[union-attr]
    finally:
        producer.close()
    warnings = [r for r in caplog.records if "broker is unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert rconn.llen(f"{prefix}q:default:4") == 3
