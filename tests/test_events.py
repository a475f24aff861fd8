"""The events stream (worker/events.py, lib.lua's emit) against a real Redis: what the scripts
append, in order, and what a reader makes of it: resume points, filters, follow, and gaps."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from worker.errors import IntentError
from worker.events import Event, EventReader, Gap, parse_from, read_events
from worker.model import Account, Intent
from worker.store import Store


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def settle(store: Store, outcomes: dict[str, dict]) -> None:  # type: ignore[type-arg]
    """Claim the default app's op-2 queue once and complete it with ``outcomes`` by id."""
    claim = store.claim("default", 2)
    assert claim.kind == "batch"
    store.complete(claim.batch_id or "", [{"id": i.id, **outcomes[i.id]} for i in claim.items],
                   calls=1, items_sent=len(claim.items))


def intents(n: int) -> list[tuple[str, Intent]]:
    return [(f"i{k}", Intent(2, f"t{k}", (Account(f"u{k}"),))) for k in range(n)]


def test_each_outcome_appends_one_event_with_its_fields(client: redis.Redis, prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0)
    store.enqueue(intents(3))
    settle(store, {"i0": {"state": "succeeded", "result_code": "0", "ret_code": 0},
                   "i1": {"state": "failed", "result_code": "1008006", "ret_code": 1008026,
                          "error": "invalid_token"},
                   "i2": {"state": "retry", "error": "http_503", "delay_s": 0}})
    events = list(read_events(client, f"{prefix}events"))
    assert all(isinstance(e, Event) for e in events)
    got = [(e.id, e.state, e.error, e.result_code, e.ret_code, e.attempts, e.verified,
            e.app, e.operator_type) for e in events if isinstance(e, Event)]
    assert got == [("i0", "succeeded", None, "0", 0, 1, None, "default", 2),
                   ("i1", "failed", "invalid_token", "1008006", 1008026, 1, None, "default", 2),
                   ("i2", "retrying", "http_503", None, None, 1, None, "default", 2)]
    assert events[0].as_dict()["at"].endswith("Z")
    settle(store, {"i2": {"state": "succeeded"}})  # after its (zero) backoff
    last = list(read_events(client, f"{prefix}events", events[-1].stream_id))
    assert [(e.id, e.state, e.attempts) for e in last if isinstance(e, Event)] == [("i2", "succeeded", 2)]


def test_a_requeue_for_a_pause_is_no_event(client: redis.Redis, prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0)
    store.enqueue(intents(1))
    settle(store, {"i0": {"state": "requeue", "error": "credentials:1008003"}})
    assert list(read_events(client, f"{prefix}events")) == []


def test_from_dollar_the_state_filter_and_follow(client: redis.Redis, prefix: str) -> None:
    key = f"{prefix}events"
    for k in range(3):
        client.xadd(key, {"id": f"old{k}", "state": "succeeded", "at": "0"})
    reader = EventReader(client, key, "$", state="failed")
    assert reader.read() == []
    client.xadd(key, {"id": "s", "state": "succeeded", "at": "0"})
    adder = threading.Thread(target=client.xadd, args=(key, {"id": "f", "state": "failed", "at": "0"}))
    adder.start()
    seen: list[Event | Gap] = []
    for _ in range(20):  # each read waits up to 5 s for an entry; one more comes at most
        seen += reader.read(block_ms=5000)
        if seen:
            break
    adder.join()
    assert [e.id for e in seen if isinstance(e, Event)] == ["f"], "the filter or the follow failed"


def test_a_resume_point_already_trimmed_yields_a_gap_then_the_rest(client: redis.Redis,
                                                                  prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0, events_maxlen=3)
    store.enqueue(intents(6))
    settle(store, {f"i{k}": {"state": "succeeded"} for k in range(6)})
    kept = list(read_events(client, f"{prefix}events"))  # from 0: what is kept, no gap
    assert [e.id for e in kept if isinstance(e, Event)] == ["i3", "i4", "i5"]
    assert not any(isinstance(e, Gap) for e in kept)
    first_kept = kept[0].stream_id
    ms = int(first_kept.split("-")[0])
    resumed = list(read_events(client, f"{prefix}events", f"{ms - 10_000}-0"))
    assert isinstance(resumed[0], Gap), "a trimmed resume point was skipped silently"
    assert resumed[0].first_id == first_kept
    assert [e.id for e in resumed[1:] if isinstance(e, Event)] == ["i3", "i4", "i5"]
    # resuming from the gap's own id does not report it again
    again = list(read_events(client, f"{prefix}events", resumed[0].stream_id))
    assert [e.id for e in again if isinstance(e, Event)] == ["i3", "i4", "i5"]
    assert not any(isinstance(e, Gap) for e in again)
    # a resume point that is still there: no gap either
    assert [e.id for e in read_events(client, f"{prefix}events", first_kept)
            if isinstance(e, Event)] == ["i4", "i5"]


@pytest.mark.parametrize("value", ["x", "1-2-3", "-1", "$0", "12 3"])
def test_a_bad_start_names_the_parameter(value: str) -> None:
    with pytest.raises(IntentError) as err:
        parse_from(value)
    assert err.value.field == "from"
    assert parse_from("1764064800000") == "1764064800000-0"


def test_a_bad_state_filter_names_the_parameter(client: redis.Redis, prefix: str) -> None:
    with pytest.raises(IntentError) as err:
        EventReader(client, f"{prefix}events", state="queued")
    assert err.value.field == "state"


def test_verification_shows_as_verifying_then_verified(client: redis.Redis, prefix: str) -> None:
    from worker.verifying import claim_verify, verify_done

    store = Store(client, prefix, linger_ms=0, verify=(0, 60_000))
    store.enqueue(intents(2))
    settle(store, {"i0": {"state": "succeeded", "result_code": "0", "ret_code": 0},
                   "i1": {"state": "succeeded", "result_code": "0", "ret_code": 0}})
    check = claim_verify(store, "default", 20)
    assert check.kind == "batch" and check.batch_id
    verify_done(store, check.batch_id, [{"id": "i0", "state": "verified"},
                                        {"id": "i1", "state": "failed", "error": "not_applied"}],
                query_calls=1)
    got = [(e.id, e.state, e.verified, e.error) for e in read_events(client, f"{prefix}events")
           if isinstance(e, Event)]
    assert got == [("i0", "verifying", False, None), ("i1", "verifying", False, None),
                   ("i0", "succeeded", True, None), ("i1", "failed", False, "not_applied")]
