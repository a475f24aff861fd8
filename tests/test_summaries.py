"""Compact terminal records (issue 16, ``worker/lua/summary.lua``) against a real Redis: a
succeeded intent keeps its whole record for ``status_detail_s`` and a summary for the status
TTL; a failed one keeps its whole record; status, enqueue and history find the summaries."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from tests.support.summaries import (
    PAYLOAD_FIELDS,
    SUCCEEDED,
    buckets,
    families,
    settle,
    without_payload,
)
from worker.history import SHARDS, HistoryQuery
from worker.model import Account, Intent
from worker.store import Store, intent_arg
from worker.verifying import claim_verify, verify_done

TTL = 3600


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def make(client: redis.Redis, prefix: str, detail: int, **kw: object) -> Store:
    args = {"max_items": 20, "linger_ms": 0, "status_ttl_s": TTL} | kw
    return Store(client, prefix, status_detail_s=detail, **args)  # type: ignore[arg-type]


def of_op(op: int, k: int | str = 0, app: str = "default", given: str | None = None) -> Intent:
    """An intent of ``op`` on token ``t<k>`` and account ``u<k>@example.com``."""
    acc = (Account(f"u{k}@example.com", 1),)
    if op == 4:
        return Intent(4, f"t{k}", (), app, given)
    if op == 5:
        return Intent(5, None, acc, app, given)
    return Intent(op, f"t{k}", acc, app, given)


def test_detail_zero_leaves_only_the_summary_with_every_field_but_the_payload(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, 0)
    store.enqueue([(f"i{op}", of_op(op, op)) for op in (1, 2, 3, 4, 5)])
    batches = dict(zip((1, 2, 3, 4, 5), settle(store), strict=True))
    for op in (1, 2, 3, 4, 5):
        assert client.exists(store.keys.record(f"i{op}")) == 0, "the whole record stayed"
        got = store.status(f"i{op}")
        assert got is not None
        assert (got.state, got.attempts, got.result_code, got.ret_code, got.err_msg, got.error,
                got.batch_id, got.verified, got.detail, got.operator_type) == (
            "succeeded", 1, "0", 0, "NO_ERROR", None, batches[op], None, "compacted", op)
        assert got.created_at.endswith("Z") and got.updated_at >= got.created_at
        out = got.to_dict()
        assert out["detail"] == "compacted"
        assert not set(PAYLOAD_FIELDS) & set(out), out
    # one family, one bucket, five summaries in it
    assert [(f["m"], f["n"]) for f in families(client, store).values()] == [(1, 5)]


def test_detail_zero_with_verification_keeps_verified_and_the_attempts(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, 0, verify=(0, 60_000))
    store.enqueue([("v0", of_op(2, 0)), ("v1", of_op(2, 1))])
    retried: set[str] = set()

    def once_retried(intent_id: str) -> dict[str, object]:
        if intent_id == "v0" or intent_id in retried:
            return SUCCEEDED
        retried.add(intent_id)
        return {"state": "retry", "delay_s": 0}

    settle(store, outcome=once_retried)  # v1 succeeds at its second attempt
    assert [s.state if s else None for s in store.statuses(["v0", "v1"])] == ["verifying"] * 2
    check = claim_verify(store, "default", 20)
    assert check.kind == "batch"
    verify_done(store, check.batch_id, [{"id": i.id, "state": "verified"} for i in check.items],
                query_calls=1)
    for intent_id, attempts in (("v0", 1), ("v1", 2)):
        assert client.exists(store.keys.record(intent_id)) == 0
        got = store.status(intent_id)
        assert got is not None
        assert (got.state, got.verified, got.attempts, got.detail) == (
            "succeeded", True, attempts, "compacted")
        assert got.to_dict()["verified"] is True


def test_detail_n_keeps_the_whole_record_for_n_then_the_summary_answers(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, 50)
    store.enqueue([(f"i{op}", of_op(op, op, "ios")) for op in (1, 2, 3, 4, 5)])
    settle(store, "ios")
    for op in (1, 2, 3, 4, 5):
        key = store.keys.record(f"i{op}")
        assert 0 < client.ttl(key) <= 50
        full = store.status(f"i{op}")
        assert full is not None and full.detail is None and full.app == "ios"
        assert set(PAYLOAD_FIELDS) & set(full.to_dict())
        client.delete(key)  # its detail period is over
        compact = store.status(f"i{op}")
        assert compact is not None
        assert compact.to_dict() == without_payload(full)
    assert sum(f["n"] for f in families(client, store, "ios").values()) == 5


def test_detail_not_shorter_than_the_ttl_writes_no_summary(client: redis.Redis,
                                                           prefix: str) -> None:
    store = make(client, prefix, TTL)
    store.enqueue([("i0", of_op(2)), ("i1", of_op(4, 1))])
    settle(store)
    for intent_id in ("i0", "i1"):
        assert 0 < client.ttl(store.keys.record(intent_id)) <= TTL
        got = store.status(intent_id)
        assert got is not None and got.detail is None and got.token is not None
    assert client.exists(store.keys.summary_meta) == 0
    assert buckets(client, store) == []


def test_failed_intents_keep_their_whole_record_and_requeue_failed_still_works(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, 0)
    store.enqueue([("f0", of_op(2, 0)), ("f1", of_op(5, 1)), ("ok", of_op(2, 2))])
    settle(store, outcome=lambda i: SUCCEEDED if i == "ok" else
           {"state": "failed", "error": "invalid_token", "result_code": "1008006"})
    for intent_id in ("f0", "f1"):
        assert 0 < client.ttl(store.keys.record(intent_id)) <= TTL
        got = store.status(intent_id)
        assert got is not None and (got.state, got.detail) == ("failed", None)
    assert store.status("f0").token == "t0"  # type: ignore[union-attr]
    assert store.status("f1").account_list == [  # type: ignore[union-attr]
        {"account": "u1@example.com", "account_type": 1}]
    assert families(client, store)[next(iter(families(client, store)))]["n"] == 1  # "ok" only
    ids, _ = store.requeue_failed()
    assert sorted(ids) == ["f0", "f1"]
    assert [s.state for s in store.statuses(["f0", "f1"]) if s] == ["queued", "queued"]
    settle(store)
    for intent_id in ("f0", "f1"):
        got = store.status(intent_id)
        assert got is not None
        assert (got.state, got.attempts, got.detail) == ("succeeded", 1, "compacted")  # fresh budget


#: ids of every packing (lib.lua id_pack): 20 hex digits, 10 characters, others
GIVEN = ("0123456789abcdef0123", "ten-chars!", "order-7", "ünïcode-id-with-a-longer-name")


@pytest.mark.parametrize("op", [1, 2, 3, 4, 5])
def test_an_explicit_id_after_compaction_is_the_same_intent_or_a_conflict(
        client: redis.Redis, prefix: str, op: int) -> None:
    store = make(client, prefix, 0)
    first = [(g, of_op(op, k, "ios" if k % 2 else "default", g)) for k, g in enumerate(GIVEN)]
    assert store.enqueue(first)[0] == [1] * len(GIVEN)
    settle(store)
    settle(store, "ios")
    assert all(s is not None and s.detail == "compacted" for s in store.statuses(list(GIVEN)))
    codes, wakes = store.enqueue(first)
    assert (codes, wakes) == ([0] * len(GIVEN), ())
    for k, g in enumerate(GIVEN):
        app = "ios" if k % 2 else "default"
        others = [of_op(op, f"{k}x", app, g),                       # another key
                  of_op(op % 5 + 1, k, app, g),                       # another op
                  of_op(op, k, "web" if app == "ios" else "ios", g)]  # another app
        if op != 4:
            acc = Account(f"u{k}@example.com", 2)                     # another account type
            tok = None if op == 5 else f"t{k}"
            others.append(Intent(op, tok, (acc,), app, g))
        assert store.enqueue([(g, other) for other in others])[0] == [-1] * len(others), others
    # nothing was stored again: still the compacted succeeded intents
    assert [(s.state, s.detail) for s in store.statuses(list(GIVEN)) if s] == [
        ("succeeded", "compacted")] * len(GIVEN)


def test_a_generated_id_is_never_looked_up_among_the_summaries(client: redis.Redis,
                                                               prefix: str) -> None:
    assert "x" not in json.loads(intent_arg("i0", of_op(2)))
    assert json.loads(intent_arg("i0", of_op(2, given="i0")))["x"] == 1
    store = make(client, prefix, 0)
    store.enqueue([("0123456789abcdef0123", of_op(2))])
    settle(store)
    # the same id again without the flag (as if generated): stored anew, the summary not read
    assert store.enqueue([("0123456789abcdef0123", of_op(4, 9))])[0] == [1]
    got = store.status("0123456789abcdef0123")
    assert got is not None and (got.state, got.operator_type, got.detail) == ("queued", 4, None)


def test_history_walks_through_compacted_intents_newest_first(client: redis.Redis,
                                                              prefix: str) -> None:
    store = make(client, prefix, 0)
    # one token bound five times; the account alice on h0, h2, h4, another one on h1, h3
    for k in range(5):
        store.enqueue([(f"h{k}", Intent(2, "tokH", (Account("alice" if k % 2 == 0 else f"b{k}"),)))])
        settle(store, outcome=lambda i: {"state": "failed", "error": "invalid_token"}
               if i == "h2" else SUCCEEDED)
    by_token = store.history(HistoryQuery("default", token="tokH"))
    assert [(s.id, s.state, s.detail) for s in by_token] == [
        ("h4", "succeeded", "compacted"), ("h3", "succeeded", "compacted"),
        ("h2", "failed", None), ("h1", "succeeded", "compacted"), ("h0", "succeeded", "compacted")]
    assert by_token[2].token == "tokH"
    by_account = store.history(HistoryQuery("default", account="alice"))
    assert [s.id for s in by_account] == ["h4", "h2", "h0"]
    assert [s.id for s in store.history(HistoryQuery("default", account="b3"))] == ["h3"]
    assert [s.id for s in store.history(HistoryQuery("default", token="tokH", limit=2))] == [
        "h4", "h3"]
    assert store.history(HistoryQuery("ios", token="tokH")) == []


def test_prune_history_keeps_heads_with_a_summary_and_drops_heads_with_neither(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix, 0)
    store.enqueue([(f"p{k}", Intent(4, f"tok{k}", ())) for k in range(20)])
    settle(store)
    store.enqueue([(f"q{k}", Intent(4, f"new{k}", ())) for k in range(5)])  # pending: kept
    for k in range(0, 20, 2):  # their summaries gone (as if their family expired)
        for bucket in buckets(client, store):
            client.hdel(bucket, f"p{k}")
    assert [store.status(f"p{k}") is None for k in range(4)] == [True, False, True, False]
    looked = dropped = 0
    while looked < SHARDS:
        shards, gone = store.prune_history(budget=5, shards=64)
        looked, dropped = looked + shards, dropped + gone
    assert dropped == 10
    heads = {v.decode() for key in client.scan_iter(match=f"{prefix}h:*") for v in client.hvals(key)}
    assert heads == {f"p{k}" for k in range(1, 20, 2)} | {f"q{k}" for k in range(5)}
    assert [s.detail for s in store.history(HistoryQuery("default", token="tok1"))] == [
        "compacted"]
