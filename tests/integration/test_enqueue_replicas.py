"""``TPNS_ENQUEUE_MIN_REPLICAS``: an enqueue through Sentinel waits (``WAIT``) for a replica's
acknowledgement; with the replica gone, the intents are reported in doubt (stored on the primary).

Real servers of the test's own: a primary, a replica of it and one Sentinel, on free ports of
127.0.0.1, all killed when the test ends.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.polling import wait_until
from tests.support.redis_faults import RedisProcess
from worker.embedded import redis_server_binary
from worker.errors import StoreUnavailableError
from worker.producer import Producer
from worker.settings import Settings
from worker.tools.drill import free_port

MASTER = "mymaster"
PREFIX = "tpnstest:replicas:"


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess, str]]:
    """(primary, replica, sentinel URL)."""
    # no 5 s wait for more replicas before a full sync (the default of Redis 7)
    primary = RedisProcess(tmp_path / "primary", "--repl-diskless-sync-delay", "0").start()
    replica = RedisProcess(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    sentinel_dir = tmp_path / "sentinel"
    sentinel_dir.mkdir()
    sentinel_port = free_port()
    conf = sentinel_dir / "sentinel.conf"  # Sentinel rewrites it: a writable file of the test's
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nprotected-mode no\ndir {sentinel_dir}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER} 60000\n")
    with (sentinel_dir / "sentinel.log").open("wb") as log:
        sentinel = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        replica.start()
        wait_until(lambda: primary.client().info("replication").get("connected_slaves") == 1 and
                   replica.client().info("replication").get("master_link_status") == "up",
                   20, message="the replica is in sync")
        yield primary, replica, f"sentinel://127.0.0.1:{sentinel_port}/{MASTER}/0"
    finally:
        sentinel.kill()
        sentinel.wait(timeout=10)
        replica.kill()
        primary.kill()


def test_an_enqueue_waits_for_a_replica_and_is_in_doubt_without_one(
        primary_and_replica: tuple[RedisProcess, RedisProcess, str]) -> None:
    primary, replica, url = primary_and_replica
    settings = Settings.from_env({"REDIS_URL": url, "TPNS_REDIS_PREFIX": PREFIX,
                                  "TPNS_ENQUEUE_MIN_REPLICAS": "1", "TPNS_ENQUEUE_WAIT_MS": "300"})
    producer = Producer(url, PREFIX, settings=settings, wake=lambda wakes: None)
    try:
        acked = producer.submit_many([{"operator_type": 4, "token": f"t{k}"} for k in range(50)])
        assert None not in acked
        # acknowledged means the replica has it already, not "soon"
        on_replica = replica.client().mget([f"{PREFIX}i:{i}" for i in acked])
        assert None not in on_replica

        replica.kill()
        wait_until(lambda: primary.client().info("replication").get("connected_slaves") == 0,
                   20, message="the primary sees the replica gone")
        with pytest.raises(StoreUnavailableError) as caught:
            producer.submit({"operator_type": 4, "token": "after"})
        exc = caught.value
        assert type(exc) is StoreUnavailableError
        assert exc.stored == [] and exc.refused == [] and len(exc.in_doubt) == 1
        assert "WAIT: 0 of 1 replicas acknowledged within 300 ms" in str(exc)
        # in doubt, but there on the primary: it can be looked up, and it will be sent
        status = producer.status(exc.in_doubt[0])
        assert status is not None and status.state == "queued"
    finally:
        producer.close()
    client: redis.Redis = primary.client()
    assert client.exists(f"{PREFIX}i:{exc.in_doubt[0]}") == 1


def test_a_read_only_replica_refuses_the_whole_call(
        primary_and_replica: tuple[RedisProcess, RedisProcess, str]) -> None:
    """What a producer meets after a failover when it still talks to the demoted primary: Redis
    answers READONLY at the script's first write, so nothing was written and nothing is in doubt."""
    _, replica, _ = primary_and_replica
    settings = Settings.from_env({"REDIS_URL": replica.url, "TPNS_REDIS_PREFIX": PREFIX})
    producer = Producer(replica.url, PREFIX, settings=settings, wake=lambda wakes: None)
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            producer.submit_many([{"operator_type": 4, "token": f"r{k}"} for k in range(3)])
    finally:
        producer.close()
    exc = caught.value
    assert type(exc) is StoreUnavailableError
    assert "read only replica" in str(exc)
    assert exc.stored == [] and exc.in_doubt == [] and len(exc.refused) == 3
    assert list(replica.client().scan_iter(match=f"{PREFIX}*")) == []
