"""The store's rules one by one, against a real Redis: linger, wakes, pause, leases, retries,
requeue, TTLs and the rate limiter."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from tests.support.polling import wait_until
from worker.model import Account, Intent
from worker.store import Store, Wake


def intent(token: str, op: int = 2, account: str = "u1", app: str = "default") -> Intent:
    if op == 4:
        return Intent(4, token, (), app)
    if op == 5:
        return Intent(5, None, (Account(account),), app)
    return Intent(op, token, (Account(account),), app)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def make(client: redis.Redis, prefix: str, **kw: float) -> Store:
    args = {"max_items": 20, "linger_ms": 0, "lease_s": 60, "status_ttl_s": 3600} | kw
    return Store(client, prefix, **args)  # type: ignore[arg-type]


def redis_ms(client: redis.Redis) -> int:
    """Redis's clock (what the scripts read), in ms: readings around a call bound what it saw."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def age(client: redis.Redis, store: Store, intent_id: str, ms: int) -> int:
    """Make an intent look eligible since ``ms`` ago (the clock is ours to move, nothing
    waits); returns Redis's time then, in ms."""
    key = store.key("i", intent_id)
    record = json.loads(client.get(key) or b"{}")
    now = redis_ms(client)
    record["c"] = now - ms
    record.pop("u", None)
    client.set(key, json.dumps(record))
    return now


def test_a_full_batch_is_claimed_at_once_and_a_partial_one_waits_for_the_linger(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, linger_ms=3_600_000)  # no test outlives it
    store.enqueue([(f"i{k}", intent(f"t{k}", account=f"u{k}")) for k in range(25)])
    first = store.claim("default", 2)
    assert first.kind == "batch" and [i.id for i in first.items] == [f"i{k}" for k in range(20)]
    assert (first.eligible, first.reason, first.eligible_left) == (25, "full", 5)
    assert 0 < first.wait_ms <= 3_600_000
    second = store.claim("default", 2)
    assert second.kind == "wait" and 0 < second.wait_ms <= 3_600_000


def test_a_partial_batch_goes_once_its_oldest_item_has_lingered(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, linger_ms=60_000)
    store.enqueue([("i1", intent("t1")), ("i2", intent("t2", account="u2")),
                   ("i3", intent("t3", account="u3"))])
    aged_at = age(client, store, "i1", 30_000)  # half the linger: not yet
    early = store.claim("default", 2)
    after = redis_ms(client)
    assert early.kind == "wait"
    assert 30_000 - (after - aged_at) <= early.wait_ms <= 30_000
    aged_at = age(client, store, "i1", 90_000)
    claim = store.claim("default", 2)
    after = redis_ms(client)
    assert claim.kind == "batch" and [i.id for i in claim.items] == ["i1", "i2", "i3"]
    assert (claim.eligible, claim.reason, claim.eligible_left) == (3, "linger", 0)
    # what the claim saw: i1 had been eligible for 90 s when it was taken
    assert 90_000 <= claim.oldest_eligible_ms <= 90_000 + (after - aged_at)


def test_a_partial_batch_goes_after_the_linger_in_real_time(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, linger_ms=30)
    store.enqueue([("i1", intent("t1")), ("i2", intent("t2", account="u2"))])
    claim = wait_until(lambda: (c := store.claim("default", 2)).kind == "batch" and c)
    assert [i.id for i in claim.items] == ["i1", "i2"]
    assert (claim.eligible, claim.reason) == (2, "linger") and claim.oldest_eligible_ms >= 30


def test_wakes_are_about_one_per_full_batch(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, linger_ms=3_600_000)  # one linger window for the whole test

    def five(k: int) -> tuple[Wake, ...]:  # one call of 5 intents, as a stream of producers
        return store.enqueue([(f"i{j}", intent(f"t{j}", account=f"u{j}")) for j in range(k, k + 5)])[1]

    wakes = [five(k) for k in range(0, 20, 5)]
    assert wakes == [(Wake("default", 2, "linger"),), (), (), (Wake("default", 2, "now"),)]
    # the immediate wake is on its way (its flag lives 2 s; here it stands for a slow worker)
    client.set(store.key("wake", "default", 2), "1", px=3_600_000)
    later = [w for k in range(20, 200, 5) for w in five(k)]
    assert later == [], "a second wake while one is on its way, or a second per linger window"
    store.clear_wake("default", 2)  # a flush started
    wakes = store.enqueue([("j1", intent("x1", account="v1"))])[1]
    assert wakes == (Wake("default", 2, "now"),)


def test_pause_holds_every_claim_and_items_stay_queued(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    store.enqueue([("i1", intent("t1"))])
    store.pause("default", 30, "credentials:1008003")
    claim = store.claim("default", 2)
    assert claim.kind == "paused" and claim.reason == "credentials:1008003" and claim.wait_ms > 0
    assert store.status("i1").state == "queued"  # type: ignore[union-attr]
    assert store.claim("ios", 2).kind == "empty", "a pause is per app"
    store.resume("default")
    assert store.claim("default", 2).kind == "batch"


def test_a_requeued_item_keeps_its_attempt_budget(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    store.enqueue([("i1", intent("t1"))])
    claim = store.claim("default", 2)
    assert claim.items[0].attempts == 1
    store.complete(claim.batch_id or "", [{"id": "i1", "state": "requeue", "error": "credentials:1008003"}],
                   calls=1, items_sent=1)
    again = store.claim("default", 2)
    assert again.items[0].attempts == 1


def test_a_retry_waits_for_its_backoff_then_goes_first(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    store.enqueue([("i1", intent("t1"))])
    claim = store.claim("default", 2)
    store.complete(claim.batch_id or "", [{"id": "i1", "state": "retry", "delay_s": 600, "error": "http_503"}],
                   calls=1, items_sent=1)
    status = store.status("i1")
    assert status is not None and status.state == "retrying" and status.error == "http_503"
    store.enqueue([("i2", intent("t2", account="u2")), ("i3", intent("t3", account="u3"))])
    first = store.claim("default", 2)
    assert [i.id for i in first.items] == ["i2", "i3"], "a retry became eligible before its backoff"
    assert first.eligible == 2
    empty = store.claim("default", 2)
    assert empty.kind == "empty" and 0 < empty.wait_ms <= 600_000  # when the retry is due
    store.enqueue([("i4", intent("t4", account="u4"))])
    # the backoff's end is ours to move: it stands for the clock passing the 600 s
    client.zadd(store.key("d", "default", 2), {"i1": 0})
    again = store.claim("default", 2)
    assert [(i.id, i.attempts) for i in again.items] == [("i1", 2), ("i4", 1)], "the retry goes first"
    assert again.eligible == 2


def test_terminal_records_expire_and_pending_ones_do_not(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, status_ttl_s=123)
    store.enqueue([("i1", intent("t1")), ("i2", intent("t2", account="u2"))])
    claim = store.claim("default", 2)
    store.complete(claim.batch_id or "", [{"id": "i1", "state": "succeeded", "result_code": "0", "ret_code": 0,
                                           "err_msg": "NO_ERROR"},
                                          {"id": "i2", "state": "retry", "delay_s": 100}],
                   calls=1, items_sent=2)
    assert 0 < client.ttl(store.key("i", "i1")) <= 123
    assert client.ttl(store.key("i", "i2")) == -1
    done = store.status("i1")
    assert done is not None and done.to_dict() | {"created_at": "", "updated_at": ""} == {
        "id": "i1", "operator_type": 2, "token": "t1", "account_list": [{"account": "u1", "account_type": 0}],
        "state": "succeeded", "attempts": 1, "result_code": "0", "ret_code": 0, "err_msg": "NO_ERROR",
        "error": None, "batch_id": claim.batch_id, "verified": None, "created_at": "",
        "updated_at": ""}
    assert done.created_at.endswith("Z") and done.updated_at >= done.created_at
    assert store.status("nope") is None


def test_nothing_is_left_behind_when_everything_is_done(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    store.enqueue([(f"i{k}", intent(f"t{k % 3}", account=f"u{k % 2}")) for k in range(10)])
    while True:
        claim = store.claim("default", 2)
        if claim.kind != "batch":
            break
        store.complete(claim.batch_id or "", [{"id": i.id, "state": "succeeded"} for i in claim.items],
                       calls=1, items_sent=len(claim.items))
    keys = {k.decode().removeprefix(prefix).split(":")[0] for k in client.scan_iter(match=f"{prefix}*")}
    # records (with a TTL), counters, metrics, the batch id sequence, the history heads (which
    # go with the records), the events stream and the timeline's two fixed rings: no key index,
    # queue or lease
    assert keys - {"wakel"} == {"i", "n", "m", "seq", "h", "events", "ts", "tm"}
    assert not list(client.scan_iter(match=f"{prefix}ko:*")), "the key index kept an entry"



def test_requeue_failed_can_filter_by_error(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    store.enqueue([("i1", intent("t1")), ("i2", intent("t2", account="u2"))])
    claim = store.claim("default", 2)
    store.complete(claim.batch_id or "", [{"id": "i1", "state": "failed", "error": "exhausted"},
                                          {"id": "i2", "state": "failed", "error": "invalid_token"}],
                   calls=1, items_sent=2)
    assert [s.id for s in store.recent_failures()] in (["i1", "i2"], ["i2", "i1"])
    client.delete(store.key("wakel", "default", 2))  # the enqueue's linger wake is long gone
    ids, wakes = store.requeue_failed("exhausted")
    assert ids == ["i1"] and wakes
    requeued = store.status("i1")
    assert requeued is not None and requeued.state == "queued" and requeued.attempts == 0
    assert client.ttl(store.key("i", "i1")) == -1, "a requeued record must not expire"
    assert store.status("i2").state == "failed"  # type: ignore[union-attr]


def test_the_rate_limit_spaces_calls_over_all_workers(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    # one call per 60 s: the k-th reservation waits for slot k, less the time since the first
    # (read from Redis's clock, so the bounds hold however slow the machine is)
    started = redis_ms(client)
    waits_ms = [round(store.throttle("default", 1 / 60) * 1000) for _ in range(5)]
    elapsed = redis_ms(client) - started
    assert waits_ms[0] == 0
    for k, wait in enumerate(waits_ms):
        assert k * 60_000 - elapsed <= wait <= k * 60_000, (k, waits_ms, elapsed)
    started = redis_ms(client)
    store.set_backoff("ios", 120.0)
    wait_ms = round(store.throttle("ios", 0) * 1000)
    elapsed = redis_ms(client) - started
    assert 120_000 - elapsed - 1 <= wait_ms <= 120_000
    assert store.throttle("android", 0) == 0, "a backoff is per app"


def test_bulk_enqueue_returns_codes_in_order_across_chunks(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, linger_ms=60_000)
    count = 1234  # more than two script calls' worth
    pairs = [(f"id{k}", intent(f"{k:040x}", account=f"user{k}@example.com")) for k in range(count)]
    pairs.insert(700, ("id5", intent(f"{5:040x}", account="user5@example.com")))  # same id, same payload
    pairs.insert(900, ("id6", intent("other")))  # same id, other payload
    codes, _ = store.enqueue(pairs)
    assert codes[:700] == [1] * 700 and codes[700] == 0 and codes[900] == -1
    assert codes.count(1) == count
    assert store.stats(["default"])["states"]["queued"] == count


def test_batch_ids_carry_a_random_part_so_a_forgotten_sequence_cannot_reissue_one(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, max_items=1)
    store.enqueue([("i1", intent("t1")), ("i2", intent("t2", account="u2"))])
    first = store.claim("default", 2)
    client.decr(f"{prefix}seq")  # what a restart that lost the last second of the AOF can do
    second = store.claim("default", 2)
    assert first.batch_id and second.batch_id
    assert first.batch_id.split(".")[0] == second.batch_id.split(".")[0] == "b1"
    assert first.batch_id != second.batch_id


def test_the_lease_check_before_an_attempt(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    store.enqueue([("i1", intent("t1"))])
    claim = store.claim("default", 2)
    assert claim.batch_id
    assert store.before_attempt("default", 0, claim.batch_id) == 0.0
    assert store.lease_held(claim.batch_id)
    assert store.before_attempt("default", 0, claim.batch_id + "x") is None  # not this claim
    client.zadd(f"{prefix}leases", {claim.batch_id: 1})  # a deadline long past
    assert store.before_attempt("default", 0, claim.batch_id) is None
    assert not store.lease_held(claim.batch_id)
    # refused before reserving a slot of the rate limit
    assert store.before_attempt("default", 10, claim.batch_id) is None
    assert client.get(f"{prefix}rate:default") is None
    store.complete(claim.batch_id, [{"id": "i1", "state": "succeeded"}], calls=1, items_sent=1)
    assert store.before_attempt("default", 0, claim.batch_id) is None


def test_counters_by_name_and_timings(client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    before = redis_ms(client)
    store.enqueue([("c1", intent("t1")), ("c2", intent("t2", op=4))])
    after = redis_ms(client)
    assert store.counters(["queued:2", "queued:4", "done_failed:2"]) == {
        "queued:2": 1, "queued:4": 1, "done_failed:2": 0}
    first, unknown = store.timings(["c1", "nope"])
    assert unknown is None and first is not None
    assert before <= first[0] == first[1] <= after  # never changed since enqueued
    assert store.timings([]) == []


def test_complete_many_records_each_batch_as_complete_does_in_one_round_trip(
        client: redis.Redis, prefix: str) -> None:
    """The flush's group commit of completions: each call is the same atomic script, each gets
    its own answer (a lease already gone shows as stale for that batch only)."""
    store = make(client, prefix, max_items=2)
    store.enqueue([(f"i{k}", intent(f"t{k}", account=f"u{k}")) for k in range(6)])
    claims = store.claim_many("default", 2, 3)
    assert [len(c.items) for c in claims] == [2, 2, 2]
    client.hdel(store.keys.batches, claims[2].batch_id or "")
    client.zrem(store.keys.leases, claims[2].batch_id or "")
    for item in claims[2].items:  # as a reap would: back to the queue, another batch's now
        record = json.loads(client.get(store.key("i", item.id)) or b"{}")
        record["b"] = "another"
        client.set(store.key("i", item.id), json.dumps(record))
    calls = [store.complete_call(c.batch_id or "", [
        {"id": i.id, "state": "succeeded", "result_code": "0"} for i in c.items],
        calls=1, items_sent=2, operator_type=2) for c in claims]
    answers = store.complete_many(calls)
    assert [(a.applied, a.stale) for a in answers] == [(2, 0), (2, 0), (0, 2)]  # type: ignore[union-attr]
    statuses = store.statuses([f"i{k}" for k in range(6)])
    assert [s.state if s else None for s in statuses] == ["succeeded"] * 4 + ["sending"] * 2
    assert store.counters()["done_succeeded:2"] == 4
