"""The store on a real three-master Redis Cluster: each app's keys in its own slot (``{app}``),
ids and batch ids that carry their app, one script call per app, counters summed over apps."""

from __future__ import annotations

import asyncio

from redis.cluster import RedisCluster

from tests.support.polling import wait_until
from worker.astore import AsyncStore
from worker.connections import async_redis_client
from worker.events import Event, EventReader
from worker.keys import tagged_prefix
from worker.model import Account, Intent
from worker.store import Store
from worker.tools.localcluster import LocalCluster


def apps_on_two_masters(cluster: LocalCluster, client: RedisCluster) -> tuple[str, str]:
    """Two app names whose hash tags land on different masters (names chosen, not assumed)."""
    by_port: dict[int, str] = {}
    for name in ("android", "ios", "web", "huawei", "beta", "gamma", "delta"):
        port = cluster.port_of_slot(client.keyslot(f"{{{name}}}"))
        by_port.setdefault(port, name)
        if len(by_port) == 2:
            first, second = by_port.values()
            return first, second
    raise AssertionError("no two candidate apps on different masters")


def make(client: RedisCluster, prefix: str, **kw: float) -> Store:
    args = {"max_items": 20, "linger_ms": 0, "lease_s": 60, "status_ttl_s": 3600} | kw
    return Store(client, prefix, **args)  # type: ignore[arg-type]


def login(token: str, account: str, app: str) -> Intent:
    return Intent(2, token, (Account(account),), app)


def test_two_apps_on_two_masters_drain_with_ids_and_batches_carrying_their_app(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str) -> None:
    store = make(cclient, cluster_prefix)
    assert store.cluster
    one, two = apps_on_two_masters(redis_cluster, cclient)
    store.register_apps([one, two])
    intents = [(f"{app}.i{k}", login(f"t{k}", f"u{k}", app)) for k in range(3) for app in (one, two)]
    codes, wakes = store.enqueue(intents)
    assert codes == [1] * 6
    assert {w.app for w in wakes} == {one, two}
    # every key of an app is on the master of the app's slot, and nowhere else
    for app in (one, two):
        port = redis_cluster.port_of_slot(cclient.keyslot(f"{{{app}}}"))
        found = list(redis_cluster.node(port).scan_iter(
            match=tagged_prefix(cluster_prefix, app) + "*"))
        assert any(":i:" in k for k in found) and any(":q:" in k for k in found)
        for other in set(redis_cluster.ports) - {port}:
            assert not list(redis_cluster.node(other).scan_iter(
                match=tagged_prefix(cluster_prefix, app) + "*"))
    for app in (one, two):
        claim = store.claim(app, 2)
        assert claim.kind == "batch" and claim.batch_id is not None
        assert claim.batch_id.endswith("." + app)
        assert [i.id for i in claim.items] == [f"{app}.i{k}" for k in range(3)]
        assert store.lease_held(claim.batch_id)
        done = store.complete(claim.batch_id, [{"id": i.id, "state": "succeeded"}
                                               for i in claim.items], calls=1, items_sent=3,
                              operator_type=2)
        assert (done.applied, done.stale) == (3, 0)
        assert not store.lease_held(claim.batch_id)
    statuses = store.statuses([i for i, _ in intents])
    assert [s.state if s else None for s in statuses] == ["succeeded"] * 6
    assert [s.app if s else None for s in statuses] == [one, two] * 3
    counters = store.counters()  # each app's, summed
    assert counters["succeeded:2"] == 6 and counters["enqueued:2"] == 6
    assert counters["calls"] == 2 and counters["items_sent"] == 6
    stats = store.stats([one, two])
    assert stats["states"]["succeeded"] == 6 and stats["queue_depth"] == 0


def test_per_key_order_holds_within_an_app_and_a_key_of_another_app_is_another_key(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str) -> None:
    store = make(cclient, cluster_prefix)
    one, two = apps_on_two_masters(redis_cluster, cclient)
    store.enqueue([(f"{one}.a", login("tok", "u1", one)), (f"{two}.x", login("tok", "u1", two)),
                   (f"{one}.b", Intent(3, "tok", (Account("u1"),), one))])
    first = store.claim(one, 2)
    assert [i.id for i in first.items] == [f"{one}.a"]
    assert store.claim(one, 3).kind == "empty"  # .b waits for .a: same token, same app
    assert [i.id for i in store.claim(two, 2).items] == [f"{two}.x"]  # not chained to one's
    assert first.batch_id is not None
    store.complete(first.batch_id, [{"id": f"{one}.a", "state": "succeeded"}], calls=1,
                   items_sent=1, operator_type=2)
    assert [i.id for i in store.claim(one, 3).items] == [f"{one}.b"]


def test_max_pending_applies_per_app(redis_cluster: LocalCluster, cclient: RedisCluster,
                                     cluster_prefix: str) -> None:
    store = make(cclient, cluster_prefix)
    one, two = apps_on_two_masters(redis_cluster, cclient)
    codes, _ = store.enqueue([(f"{one}.{k}", login(f"t{k}", f"u{k}", one)) for k in range(3)]
                             + [(f"{two}.{k}", login(f"t{k}", f"u{k}", two)) for k in range(2)],
                             max_pending=2)
    assert codes == [1, 1, -2, 1, 1]


def test_expired_leases_of_every_app_are_reaped(redis_cluster: LocalCluster,
                                                cclient: RedisCluster,
                                                cluster_prefix: str) -> None:
    store = make(cclient, cluster_prefix, lease_s=0.2)
    one, two = apps_on_two_masters(redis_cluster, cclient)
    store.register_apps([one, two])
    store.enqueue([(f"{one}.a", login("t", "u", one)), (f"{two}.a", login("t", "u", two))])
    claims = [store.claim(app, 2) for app in (one, two)]
    assert all(c.kind == "batch" for c in claims)
    reclaimed = wait_until(lambda: store.reap()[0], 30, message="expired leases reaped")
    if reclaimed < 2:
        reclaimed += wait_until(lambda: store.reap()[0], 30, message="the other app's lease")
    assert reclaimed == 2
    assert store.counters()["leases_reclaimed"] == 2
    assert [s.state if s else None for s in store.statuses([f"{one}.a", f"{two}.a"])] \
        == ["queued", "queued"]


def test_the_async_store_enqueues_one_call_per_app_and_reads_back_in_input_order(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str) -> None:
    one, two = apps_on_two_masters(redis_cluster, cclient)
    pairs = [(f"{one}.a", login("t1", "u1", one)), (f"{two}.a", login("t1", "u1", two)),
             (f"{one}.b", login("t1", "u1", one)), (f"{two}.a", login("t2", "u2", two))]

    async def run() -> tuple[list[int], list[str | None]]:
        store = AsyncStore(async_redis_client(redis_cluster.url), cluster_prefix, linger_ms=0)
        assert store.cluster
        codes = [c async for rnd in store.enqueue_rounds(pairs) for c in rnd.codes]
        found = await store.statuses([f"{two}.a", f"{one}.b", f"{one}.zz"])
        await store.redis.aclose()
        return codes, [s.state if s else None for s in found]

    codes, states = asyncio.run(run())
    assert codes == [1, 1, 1, -1]  # the last: the same id in its app, another payload
    assert states == ["queued", "queued", None]


def test_each_app_has_its_own_events_stream_and_a_reader_may_name_the_app(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str) -> None:
    store = make(cclient, cluster_prefix)
    one, two = apps_on_two_masters(redis_cluster, cclient)
    store.enqueue([(f"{one}.a", login("t", "u", one)), (f"{two}.a", login("t", "u", two))])
    for app in (one, two):
        claim = store.claim(app, 2)
        assert claim.batch_id is not None
        store.complete(claim.batch_id, [{"id": f"{app}.a", "state": "succeeded"}], calls=1,
                       items_sent=1, operator_type=2)
    for app in (one, two):
        reader = EventReader(cclient, store.app_events_key(app), "0")
        read = reader.read()
        assert [(e.id, e.state) for e in read if isinstance(e, Event)] == [
            (f"{app}.a", "succeeded")]
        # resuming after it: the gap check reads the stream's info (unparsed on a cluster)
        assert EventReader(cclient, store.app_events_key(app), read[0].stream_id).read() == []
        assert store.events_key(app) == store.scope(app).events
    assert store.events_key(None) is None  # no one stream: readers merge (test_events_merged)
