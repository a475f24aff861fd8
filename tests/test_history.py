"""History by key (worker/history.py, lua/history.lua) against a real Redis: newest first, per app
and key, bounded by the records' lives, with the parameters' rules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from worker.errors import IntentError
from worker.history import SHARDS, HistoryQuery, history_query
from worker.keys import history_field
from worker.model import Account, Intent
from worker.store import Store


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def drain(store: Store, app: str = "default") -> None:
    """Claim and complete everything eligible: the odd ids fail, the others succeed."""
    while True:
        claims = [store.claim(app, op) for op in (1, 2, 3, 4, 5)]
        batches = [c for c in claims if c.kind == "batch"]
        if not batches:
            return
        for claim in batches:
            store.complete(claim.batch_id or "", [
                {"id": i.id, "state": "failed" if int(i.id[1:]) % 2 else "succeeded",
                 "error": "invalid_token" if int(i.id[1:]) % 2 else None}
                for i in claim.items], calls=1, items_sent=len(claim.items))


def ids(statuses: list) -> list[str]:  # type: ignore[type-arg]
    return [s.id for s in statuses]


def test_history_by_token_and_by_account_newest_first_with_states(client: redis.Redis,
                                                                  prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0)
    store.enqueue([
        ("i0", Intent(2, "tokA", (Account("alice", 0),))),
        ("i1", Intent(3, "tokA", (Account("alice", 0),))),
        ("i2", Intent(2, "tokB", (Account("alice", 0), Account("bob", 7)))),
        ("i3", Intent(4, "tokA", ())),
        ("i4", Intent(5, None, (Account("alice", 0),))),
        ("i5", Intent(2, "tokA", (Account("alice", 7),))),          # another account type
        ("i6", Intent(2, "tokA", (Account("alice", 0),), "ios")),    # another app
    ])
    by_token = store.history(HistoryQuery("default", token="tokA"))
    assert ids(by_token) == ["i5", "i3", "i1", "i0"]
    assert {s.state for s in by_token} == {"queued"}
    assert ids(store.history(HistoryQuery("default", account="alice"))) == ["i4", "i2", "i1", "i0"]
    assert ids(store.history(HistoryQuery("default", account="alice", account_type=7))) == ["i5"]
    assert ids(store.history(HistoryQuery("default", account="bob", account_type=7))) == ["i2"]
    assert ids(store.history(HistoryQuery("ios", token="tokA"))) == ["i6"]
    assert store.history(HistoryQuery("default", token="nobody")) == []
    drain(store)
    drain(store, "ios")
    after = store.history(HistoryQuery("default", token="tokA"))
    assert [(s.id, s.state, s.error) for s in after] == [
        ("i5", "failed", "invalid_token"), ("i3", "failed", "invalid_token"),
        ("i1", "failed", "invalid_token"), ("i0", "succeeded", None)]
    assert ids(store.history(HistoryQuery("default", token="tokA", limit=2))) == ["i5", "i3"]


def test_history_ends_where_records_expired_and_the_dead_head_is_dropped(client: redis.Redis,
                                                                         prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0)
    store.enqueue([(f"i{k}", Intent(2, "tokA", (Account(f"u{k}"),))) for k in range(4)])
    client.delete(f"{prefix}i:i1")  # as if its TTL ran out: i0 behind it is older, gone too
    assert ids(store.history(HistoryQuery("default", token="tokA"))) == ["i3", "i2"]
    client.delete(f"{prefix}i:i3")
    d = HistoryQuery("default", token="tokA").digest()
    assert client.hexists(f"{prefix}h:{d[:3]}", history_field(d))
    assert store.history(HistoryQuery("default", token="tokA")) == []
    assert not client.hexists(f"{prefix}h:{d[:3]}", history_field(d)), "the dead head stayed"


def test_the_index_costs_no_link_for_a_key_seen_once(client: redis.Redis, prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0)
    store.enqueue([("i0", Intent(2, "tokA", (Account("a"),))), ("i1", Intent(2, "tokB", (Account("a"),)))])
    assert b'"hp"' not in (client.get(f"{prefix}i:i0") or b"")
    assert b'"hp":["","i0"]' in (client.get(f"{prefix}i:i1") or b"")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({}, "token"),
    ({"token": "t", "account": "a"}, "token"),
    ({"token": ""}, "token"),
    ({"account": "  "}, "account"),
    ({"token": "t", "account_type": 1}, "account_type"),
    ({"account": "a", "account_type": "x"}, "account_type"),
    ({"account": "a", "account_type": -1}, "account_type"),
    ({"token": "t", "limit": 0}, "limit"),
    ({"token": "t", "limit": 501}, "limit"),
    ({"token": "t", "limit": "many"}, "limit"),
    ({"token": "t", "app": ""}, "app"),
])
def test_bad_parameters_name_the_parameter(kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(IntentError) as err:
        history_query(**kwargs)
    assert err.value.field == field


def test_parameters_default_and_parse() -> None:
    q = history_query(account="a", account_type="3", limit="500", default_app="ios")
    assert (q.app, q.account, q.account_type, q.limit, q.token) == ("ios", "a", 3, 500, None)
    assert history_query(token="t").limit == 50


def test_the_sweep_drops_heads_of_expired_records_and_keeps_the_others(
        client: redis.Redis, prefix: str) -> None:
    store = Store(client, prefix, linger_ms=0)
    store.enqueue([(f"i{k}", Intent(4, f"tok{k}", ())) for k in range(40)])
    for k in range(0, 40, 2):
        client.delete(f"{prefix}i:i{k}")  # expired
    looked = dropped = 0
    while looked < SHARDS:  # one pass, as the sweep makes it beat after beat
        shards, gone = store.prune_history(budget=5, shards=64)
        assert 1 <= shards <= 64
        looked, dropped = looked + shards, dropped + gone
    assert dropped == 20
    heads = {v.decode() for key in client.scan_iter(match=f"{prefix}h:*") for v in client.hvals(key)}
    assert heads == {f"i{k}" for k in range(1, 40, 2)}
    assert ids(store.history(HistoryQuery("default", token="tok1"))) == ["i1"]
