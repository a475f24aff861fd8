"""The timeline's rings (lib.lua's tl_add / tl_sample_depth, worker/timeline.py) on a real Redis:
what the scripts count in the same call, how a slot is reused, and the fixed size of the rings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from worker.keys import TIMELINE_MINUTES_KEPT, TIMELINE_SECONDS_KEPT
from worker.model import Account, Intent
from worker.store import Store
from worker.timeline import quantile_ms, read_timeline


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def intents(n: int, start: int = 0) -> list[tuple[str, Intent]]:
    return [(f"i{k}", Intent(2, f"t{k}", (Account(f"u{k}"),))) for k in range(start, start + n)]


def test_scripts_count_intents_calls_latency_failures_and_depth(client: redis.Redis,
                                                                 prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0, max_items=3)
    store.enqueue(intents(5))
    store.enqueue(intents(1))  # the same id again: not counted in
    claim = store.claim("default", 2)
    assert claim.kind == "batch" and len(claim.items) == 3
    ids = [item.id for item in claim.items]
    store.complete(claim.batch_id or "", [
        {"id": ids[0], "state": "succeeded"}, {"id": ids[1], "state": "succeeded"},
        {"id": ids[2], "state": "failed", "error": "invalid_token"}],
        calls=2, items_sent=3, operator_type=2,
        call_metrics=[("ok", 7.0), ("partly_failed", 400.0)])
    store.reap()  # the sweep's call: samples the depth (2 queued)

    t = read_timeline(client, store.keys)
    sec, mins = t["seconds"], t["minutes"]
    assert len(sec["in"]) == TIMELINE_SECONDS_KEPT and len(mins["in"]) == TIMELINE_MINUTES_KEPT
    assert sec["start"] == t["now"] - TIMELINE_SECONDS_KEPT + 1
    for series in (sec, mins):
        assert sum(series["in"]) == 5
        assert sum(series["succeeded"]) == 2 and sum(series["failed"]) == 1
        assert sum(series["calls"]) == 2
        assert [d for d in series["depth"] if d is not None] == [2]
    assert {k: sum(v) for k, v in mins["failures_by_reason"].items()} == {"invalid_token": 1}
    assert {k: sum(v) for k, v in mins["calls_by_class"].items()} == {"ok": 1,
                                                                       "partly_failed": 1}
    assert [p for p in mins["latency_p50_ms"] if p is not None] == [10.0]
    assert [p for p in mins["latency_p99_ms"] if p is not None] == [500.0]


def test_a_slot_coming_round_again_is_emptied_before_it_counts(client: redis.Redis,
                                                               prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0)
    seconds_key, minutes_key = store.keys.timeline
    now = int(client.time()[0])
    # every slot holds a unit one whole ring ago, with counts, as after an idle hour
    for unit in range(now - 2 * TIMELINE_SECONDS_KEPT + 1, now - TIMELINE_SECONDS_KEPT + 1):
        slot = unit % TIMELINE_SECONDS_KEPT
        client.hset(seconds_key, mapping={str(slot): unit, f"{slot}:in": 99, f"{slot}:d": 7})
    minute = now // 60
    for unit in range(minute - 2 * TIMELINE_MINUTES_KEPT + 1,
                      minute - TIMELINE_MINUTES_KEPT + 1):
        slot = unit % TIMELINE_MINUTES_KEPT
        client.hset(minutes_key, mapping={str(slot): unit, f"{slot}:in": 99,
                                          f"{slot}:er:old_reason": 5})
    assert sum(read_timeline(client, store.keys)["seconds"]["in"]) == 0  # stale: not shown

    store.enqueue(intents(1))
    raw = {k.decode(): int(v) for k, v in client.hgetall(seconds_key).items()}
    fresh = [k for k in raw if ":" not in k and raw[k] > now - TIMELINE_SECONDS_KEPT]
    assert len(fresh) == 1
    assert raw[f"{fresh[0]}:in"] == 1 and f"{fresh[0]}:d" not in raw
    minutes = {k.decode(): int(v) for k, v in client.hgetall(minutes_key).items()}
    slot = next(k for k in minutes
                if ":" not in k and minutes[k] > minute - TIMELINE_MINUTES_KEPT)
    assert minutes[f"{slot}:in"] == 1 and f"{slot}:er:old_reason" not in minutes
    t = read_timeline(client, store.keys)
    assert sum(t["seconds"]["in"]) == 1 and sum(t["minutes"]["in"]) == 1
    assert t["minutes"]["failures_by_reason"] == {}


def test_the_rings_are_bounded_whatever_the_traffic(client: redis.Redis, prefix: str) -> None:
    """Every slot of both rings busy: the fields stay within the fixed bound (no per-intent
    growth), which is what the state bytes of the timeline rest on."""
    store = Store(client, prefix, linger_ms=0)
    seconds_key, minutes_key = store.keys.timeline
    now = int(client.time()[0])
    for unit in range(now - TIMELINE_SECONDS_KEPT + 1, now + 1):
        slot = unit % TIMELINE_SECONDS_KEPT
        client.hset(seconds_key, mapping={str(slot): unit, **{f"{slot}:{s}": 1000
                                                              for s in ("in", "ok", "f", "c", "d")}})
    store.enqueue(intents(200))
    assert client.hlen(seconds_key) <= TIMELINE_SECONDS_KEPT * 6
    assert client.hlen(minutes_key) <= TIMELINE_MINUTES_KEPT * 40


def test_quantiles_come_from_the_bucket_bounds() -> None:
    assert quantile_ms({}, 0.5) is None
    assert quantile_ms({"5": 98, "1000": 1, "+Inf": 1}, 0.5) == 5.0
    assert quantile_ms({"5": 98, "1000": 1, "+Inf": 1}, 0.99) == 1000.0
    assert quantile_ms({"+Inf": 3}, 0.5) == 10000.0
