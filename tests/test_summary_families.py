"""The families of summaries (``worker/lua/summary.lua``) as Redis holds them: linear hashing
keeps every bucket a small listpack, one TTL per bucket, expired families leave the meta hash;
and the summaries found through every door: the cluster store, ``AsyncStore``, ``Producer``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from tests.support.summaries import buckets, families, overflows, settle, without_payload
from worker.astore import AsyncStore
from worker.connections import async_redis_client
from worker.errors import IdConflictError
from worker.history import HistoryQuery
from worker.keys import SUMMARY_LOAD, SUMMARY_SPAN_MIN_S, tagged_prefix
from worker.model import Account, Intent
from worker.producer import Producer
from worker.settings import Settings
from worker.store import Store
from worker.tools.localcluster import LocalCluster

#: the compact encodings of a small hash (Redis 7 and the embedded 6.2)
COMPACT = {"listpack", "ziplist"}


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def make(client: redis.Redis, prefix: str, ttl: int = 3600, **kw: object) -> Store:
    args = {"max_items": 100, "linger_ms": 0, "status_ttl_s": ttl, "status_detail_s": 0} | kw
    return Store(client, prefix, **args)  # type: ignore[arg-type]


def now_s(client: redis.Redis) -> int:
    return int(client.time()[0])


def test_thousands_of_summaries_split_into_listpack_buckets_all_found(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    count = 3000
    ids = [f"{k:020x}" if k % 3 else f"id-{k}" for k in range(count)]  # both packings
    store.enqueue([(i, Intent(4, f"tok-{k:064x}", ())) for k, i in enumerate(ids)])
    settle(store)
    found = store.statuses(ids)
    assert all(s is not None and (s.state, s.detail) == ("succeeded", "compacted") for s in found)
    fams = families(client, store)
    keys = buckets(client, store)
    assert sum(f["n"] for f in fams.values()) == count
    assert sum(f["m"] for f in fams.values()) == len(keys)
    assert len(keys) * SUMMARY_LOAD >= count, "fewer buckets than the load allows"
    assert sum(int(client.hlen(k)) for k in keys) == count
    for key in keys:
        assert client.object("encoding", key).decode() in COMPACT, key  # type: ignore[union-attr]
    span = max(SUMMARY_SPAN_MIN_S, min(86400, 3600 // 8))
    for start, fam in fams.items():
        assert fam["x"] == int(start) + span + 3600
        for key in keys:
            if key.split(":")[-2] == start:
                assert 0 < client.ttl(key) <= span + 3600


def test_a_small_ttl_gives_buckets_the_shortest_span_and_its_ttl(client: redis.Redis,
                                                                 prefix: str) -> None:
    store = make(client, prefix, ttl=8)
    store.enqueue([(f"s{k}", Intent(4, f"t{k}", ())) for k in range(3)])
    before = now_s(client)
    settle(store)
    after = now_s(client)
    [(start, fam)] = families(client, store).items()
    assert int(start) % SUMMARY_SPAN_MIN_S == 0
    assert before - SUMMARY_SPAN_MIN_S < int(start) <= after
    assert fam["x"] == int(start) + SUMMARY_SPAN_MIN_S + 8
    for key in buckets(client, store):
        ttl = client.ttl(key)
        read_at = now_s(client)  # a slow machine may read it well after ``after``
        assert 8 <= ttl + (read_at - before) and ttl <= SUMMARY_SPAN_MIN_S + 8
    assert store.status("s0") is not None
    # a family whose time is up is not read, even while its buckets are still there
    client.hset(store.keys.summary_meta, f"{start}:x", before - 1)
    assert store.status("s0") is None


def test_opening_a_family_forgets_the_expired_ones_and_keeps_the_live_ones(
        client: redis.Redis, prefix: str) -> None:
    store = make(client, prefix)
    now = now_s(client)
    meta = store.keys.summary_meta
    client.hset(meta, mapping={"1000": 3, "1000:n": 300, "1000:x": now - 5,       # expired
                               "2000": 1, "2000:n": 9, "2000:x": now + 10_000})  # live
    store.enqueue([("o0", Intent(4, "t0", ()))])
    settle(store)
    fams = families(client, store)
    assert "1000" not in fams
    assert fams["2000"] == {"m": 1, "n": 9, "x": now + 10_000}
    assert [f["n"] for s, f in fams.items() if s != "2000"] == [1]
    assert store.status("o0") is not None  # found in the new family, past the live one


def test_the_cluster_store_compacts_in_the_apps_slot_and_finds_it_by_id(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str) -> None:
    store = Store(cclient, cluster_prefix, linger_ms=0, status_detail_s=0)  # type: ignore[arg-type]
    app = "android"
    given = f"{app}.order-1"
    intent = Intent(2, "tokC", (Account("c@example.com"),), app, given)
    assert store.enqueue([(given, intent), (f"{app}.gen", Intent(4, "tokD", (), app))])[0] == [1, 1]
    batches = settle(store, app)
    assert all(b.endswith("." + app) for b in batches)
    port = redis_cluster.port_of_slot(cclient.keyslot(f"{{{app}}}"))
    node = redis_cluster.node(port)
    assert list(node.scan_iter(match=tagged_prefix(cluster_prefix, app) + "c:*"))
    assert node.exists(tagged_prefix(cluster_prefix, app) + "cm")
    got = store.statuses([given, f"{app}.gen", f"{app}.nope"])
    assert [(s.app, s.state, s.detail) if s else None for s in got] == [
        (app, "succeeded", "compacted"), (app, "succeeded", "compacted"), None]
    assert {s.batch_id for s in got if s} <= set(batches)  # the app's suffix kept
    assert store.enqueue([(given, intent)])[0] == [0]
    other = Intent(2, "tokC", (Account("d@example.com"),), app, given)
    assert store.enqueue([(given, other)])[0] == [-1]

    async def read() -> list[str | None]:
        astore = AsyncStore(async_redis_client(redis_cluster.url), cluster_prefix)
        found = await astore.statuses([given, f"{app}.nope"])
        await astore.redis.aclose()
        return [s.detail if s else None for s in found]

    assert asyncio.run(read()) == ["compacted", None]


def test_async_store_statuses_find_compacted_ones(client: redis.Redis, redis_url: str,
                                                  prefix: str) -> None:
    store = make(client, prefix)
    store.enqueue([("a0", Intent(4, "t0", ())), ("a1", Intent(4, "t1", ()))])
    settle(store)
    store.enqueue([("a2", Intent(4, "t2", ()))])  # pending: its whole record

    async def read() -> list[tuple[str, str | None] | None]:
        astore = AsyncStore(async_redis_client(redis_url), prefix)
        found = await astore.statuses(["a0", "a2", "nope", "a1"])
        await astore.redis.aclose()
        return [(s.state, s.detail) if s else None for s in found]

    assert asyncio.run(read()) == [("succeeded", "compacted"), ("queued", None), None,
                                   ("succeeded", "compacted")]


def test_the_producer_answers_a_repeated_id_as_before_and_shows_compacted_statuses(
        redis_url: str, prefix: str) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_LINGER_MS": "0", "TPNS_STATUS_DETAIL_S": "0"})
    body = {"operator_type": 2, "token": "tokP", "account_list": [{"account": "p@example.com"}],
            "id": "signup-42"}
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer:
        assert producer.store.status_detail_s == 0
        assert producer.submit(body) == "signup-42"
        settle(producer.store)
        [done] = producer.wait(["signup-42"], timeout_s=30)
        assert done is not None and (done.state, done.detail) == ("succeeded", "compacted")
        got = producer.status("signup-42")
        assert got is not None and got.to_dict()["detail"] == "compacted"
        assert "token" not in got.to_dict()
        assert producer.submit(body) == "signup-42"
        assert producer.submit_many([body, body | {"token": "other"}]) == ["signup-42", None]
        with pytest.raises(IdConflictError):
            producer.submit(body | {"operator_type": 1})
        assert producer.stats()["states"]["queued"] == 0
        [hist] = producer.history("tokP")
        assert (hist.id, hist.detail) == ("signup-42", "compacted")


def test_summaries_of_real_traffic_stay_in_listpack_buckets_and_read_back_whole(
        client: redis.Redis, prefix: str) -> None:
    """Keys bound and unbound again and again (history links), TPNS's answers (ret_code,
    err_msg, a partly failed call), other apps and long ids: each summary still fits a listpack
    entry (``hash-max-listpack-value``), or the bucket would turn into a hashtable; and each one
    reads back as the whole record did, but for the payload."""
    store = make(client, prefix, status_detail_s=600)
    partly = {"state": "succeeded", "result_code": "0", "ret_code": 1008026,
              "err_msg": "batch op, partly error"}
    ok = {"state": "succeeded", "result_code": "0", "ret_code": 0, "err_msg": "NO_ERROR"}
    ids: list[str] = []
    for rnd in range(4):
        pairs = []
        for k in range(60):
            app = ("default", "ios", "android-production")[k % 3]
            token = f"{k:064x}"
            account = Account(f"user{k:08d}@example.com" if rnd < 2 else f"other{k}@example.com",
                              1005)
            intent_id = f"{rnd:04x}{k:016x}"
            if k % 5 == 0:  # long ids: a link to one is too long, or the id itself (> 64)
                intent_id = f"{rnd}-{k}-" + "x" * (40 if k % 10 else 70)
            op = (2, 3, 1, 2)[rnd] if k % 7 else 4
            pairs.append((intent_id, Intent(op, token, () if op == 4 else (account,), app)))
        store.enqueue(pairs)
        for app in ("default", "ios", "android-production"):
            settle(store, app, lambda i: partly if i.endswith(("1", "3")) else ok)
        ids += [i for i, _ in pairs]
    full = store.statuses(ids)
    for intent_id in ids:
        client.delete(store.keys.record(intent_id))  # their detail period is over
    compact = store.statuses(ids)
    for before, after in zip(full, compact, strict=True):
        assert before is not None and after is not None
        assert after.to_dict() == without_payload(before)
    for key in buckets(client, store):
        assert client.object("encoding", key).decode() in COMPACT, key  # type: ignore[union-attr]
    # the summaries too long for a listpack entry are in the families' overflow hashes, which
    # expire with their buckets; the others are in the buckets themselves
    over = overflows(client, store)  # standalone: every app's summaries in the same families
    assert over
    in_buckets = sum(int(client.hlen(k)) for k in buckets(client, store))
    long_ids = sum(1 for i in ids if len(i) > 64)
    assert in_buckets == len(ids) - long_ids
    for key in over:
        assert 0 < client.ttl(key) <= 3600 + 3600 // 8
    walked = store.history(HistoryQuery("ios", token=f"{1:064x}"))
    assert [s.id for s in walked] == [f"{rnd:04x}{1:016x}" for rnd in (3, 2, 1, 0)]
    assert {s.detail for s in walked} == {"compacted"}
