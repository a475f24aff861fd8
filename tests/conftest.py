"""Shared fixtures: a real Redis (the machine's, or a private one started here), per-test prefixes
and the sandbox. Helpers that are plain functions or classes live in ``tests/support/``; the tree of
``tests/`` mirrors ``worker/`` (``tests/integration/`` runs real worker processes).

Tests never touch keys they did not create: each test gets its own key prefix (which also prefixes
the Celery broker's keys) and every key under it is deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, settings
from redis.cluster import RedisCluster

from worker.connections import redis_client
from worker.embedded import start_private
from worker.sandbox.server import SandboxServer
from worker.tools.localcluster import LocalCluster

#: ``TPNS_TEST_PROFILE=extended`` runs the long fuzz profile; the default one is short and fixed:
#: the same examples every run (derandomized, no example database), so a verdict never depends
#: on luck. A test that costs more per example scales its own count with ``fuzz.examples``.
PROFILE = "extended" if os.environ.get("TPNS_TEST_PROFILE") == "extended" else "default"
settings.register_profile("default", derandomize=True, database=None, deadline=None,
                          max_examples=100, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("extended", derandomize=False, database=None, deadline=None,
                          max_examples=2000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(PROFILE)


def _reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        client.ping()
        client.close()
        return True
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis server: $TPNS_TEST_REDIS_URL, else 127.0.0.1:6379, else a private one."""
    url = os.environ.get("TPNS_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
    if _reachable(url):
        yield url
        return
    proc, private_url = start_private(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield private_url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted when the test ends."""
    value = f"tpnstest:{uuid.uuid4().hex[:10]}:"
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{value}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    client.close()


@pytest.fixture
def rconn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """The TPNS sandbox in this process, on a free port of 127.0.0.1 (real sockets), with its
    default credentials. Seeded: a fault rate a test sets between 0 and 1 draws the same faults
    every run. A test that needs other credentials ``configure``s it."""
    with SandboxServer(seed=1) as server:
        yield server


@pytest.fixture(scope="module")
def module_sandbox() -> Iterator[SandboxServer]:
    """One sandbox for a whole module, for property tests (hypothesis runs many examples in one
    test function, so a function-scoped fixture would not be reset between them: such a test
    resets the sandbox itself)."""
    with SandboxServer(seed=1) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real three-master Redis Cluster on free ports of 127.0.0.1, from the embedded Redis's
    binaries (so no system Redis and no network are needed); started once per session."""
    with LocalCluster(Path(tmp_path_factory.mktemp("cluster"))) as cluster:
        yield cluster


@pytest.fixture
def cluster_prefix(redis_cluster: LocalCluster) -> Iterator[str]:
    """A key prefix of this test's own on the cluster; its keys are deleted on every master."""
    value = f"tpnstest:{uuid.uuid4().hex[:10]}:"
    yield value
    for port in redis_cluster.ports:
        node = redis_cluster.node(port)
        for key in list(node.scan_iter(match=f"{value}*", count=1000)):
            node.delete(key)  # one key a call: keys of several slots cannot go in one DEL


@pytest.fixture
def cclient(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    """A cluster client of the test's own (closed after it), shared by the cluster tests."""
    client = redis_client(redis_cluster.url)
    assert isinstance(client, RedisCluster)
    yield client
    client.close()
