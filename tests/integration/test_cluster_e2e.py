"""End to end on a Redis Cluster (issue 16): real worker processes whose store is a real
three-master cluster (``redis+cluster://``) and whose wakes go through a standalone Redis
(``CELERY_BROKER_URL``), two apps whose keys live on different masters, the sandbox over sockets.

One run covers the drain, per-key order and a worker SIGKILLed with calls in flight: the second
worker reaps every app's expired leases (each app has its own, in its slot) and finishes the work.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from worker.keys import tagged_prefix
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings
from worker.tools.localcluster import LocalCluster

from .conftest import Launcher, product_env
from .test_worker_e2e import (
    assert_all_succeeded,
    assert_per_key_order,
    assert_sandbox_matches_model,
    kill_with_calls_held,
    mixed_intents,
    submit,
    wait_all_terminal,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster_keys(redis_cluster: LocalCluster, prefix: str) -> Iterator[str]:
    """The test's prefix on the cluster too (the broker's keys use it on the standalone Redis);
    every cluster key under it is deleted afterwards."""
    yield prefix
    for port in redis_cluster.ports:
        node = redis_cluster.node(port)
        for key in list(node.scan_iter(match=f"{prefix}*", count=1000)):
            node.delete(key)


def two_apps(cluster: LocalCluster) -> tuple[str, str]:
    """Two app names whose slots are on different masters."""
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        seen: dict[int, str] = {}
        for name in ("android", "ios", "web", "huawei", "beta", "gamma", "delta"):
            seen.setdefault(cluster.port_of_slot(client.keyslot(f"{{{name}}}")), name)
            if len(seen) == 2:
                first, second = seen.values()
                return first, second
    finally:
        client.close()
    raise AssertionError("no two candidate apps on different masters")


def of_app(intents: list[dict[str, Any]], app: str) -> list[dict[str, Any]]:
    """``intents`` for ``app``, with tokens and accounts of its own (the sandbox is shared)."""
    out = []
    for intent in intents:
        copy = {**intent, "app": app}
        if "token" in copy:
            copy["token"] = f"{app}-{copy['token']}"
        if "account" in copy:
            copy["account"] = f"{app}-{copy['account']}"
        if "account_list" in copy:
            copy["account_list"] = [{**a, "account": f"{app}-{a['account']}"}
                                    for a in copy["account_list"]]
        out.append(copy)
    return out


def test_two_apps_on_two_masters_drain_in_order_through_a_worker_sigkill(
        redis_cluster: LocalCluster, redis_url: str, cluster_keys: str, sandbox: SandboxServer,
        launcher: Launcher) -> None:
    prefix = cluster_keys
    one, two = two_apps(redis_cluster)
    env = {"CELERY_BROKER_URL": redis_url, "TPNS_APPS": f"{one},{two}",
           "TPNS_LOG_FORMAT": "json"}
    settings = Settings.from_env(product_env(redis_cluster.url, prefix,
                                             TPNS_BASE_URL=sandbox.url, **env))
    producer = Producer(redis_cluster.url, prefix, settings=settings)
    assert producer.store.cluster
    intents = [*of_app(mixed_intents(300, tokens=90, accounts=90, seed=5), one),
               *of_app(mixed_intents(300, tokens=90, accounts=90, seed=6), two)]
    ids = submit(producer, intents)
    assert {i.split(".", 1)[0] for i in ids} == {one, two}  # ids carry their app

    # a timeout and a lease far longer than the test: a held call stays in flight
    first = launcher.start(redis_cluster.url, prefix, sandbox, name="c1",
                           TPNS_HTTP_TIMEOUT_S="30", TPNS_LEASE_S="120", **env)
    kill_with_calls_held(producer, sandbox, first, done=60, in_flight=2)
    assert producer.stats()["in_flight"] > 0
    # each app's leases end now (the clock is ours to move): they are in the app's own slot
    client = producer.store.redis
    for app in (one, two):
        leases = tagged_prefix(prefix, app) + "leases"
        held_batches = client.zrange(leases, 0, -1)
        if held_batches:
            client.zadd(leases, dict.fromkeys(held_batches, 0))
    sandbox.release()

    launcher.start(redis_cluster.url, prefix, sandbox, name="c2", **env)
    wait_all_terminal(producer, len(intents), 120)

    assert_all_succeeded(producer, ids)
    stats = producer.stats()
    assert stats["leases_reclaimed"] > 0 and stats["queue_depth"] == 0
    assert set(stats["apps"]) >= {one, two}
    assert_sandbox_matches_model(sandbox, intents)
    assert_per_key_order(sandbox.applied(), intents)
    # the broker's Redis carried wakes only: no key of the store is there
    broker = redis.Redis.from_url(redis_url)
    assert not list(broker.scan_iter(match=f"{prefix}{{*", count=1000))
    broker.close()
    producer.close()
