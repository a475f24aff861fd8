"""Moving an app's slot to another master (``worker.clustermove``), against the real cluster:
the app is held (enqueue refused before writing, claims paused) until its batches in flight end,
its keys move, and it resumes on the new master with everything it had."""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner
from redis.cluster import RedisCluster

from tests.support.polling import wait_until
from worker.cli import main
from worker.clustermove import MOVING, MoveReport, move_app
from worker.errors import ConfigError
from worker.model import Account, Intent
from worker.store import AppMovingError, Store
from worker.tools.localcluster import LocalCluster

#: an app of this test alone: its slot is the one that moves (other tests' apps stay put)
APP = "mover"


def login(k: int) -> Intent:
    return Intent(2, f"tok{k}", (Account(f"u{k}"),), APP)


def test_an_app_moves_to_another_master_after_its_calls_in_flight_and_resumes_there(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str) -> None:
    store = Store(cclient, cluster_prefix, max_items=5, linger_ms=0, lease_s=60,
                  status_ttl_s=3600)
    store.register_apps([APP])
    ids = [f"{APP}.{k}" for k in range(12)]
    assert store.enqueue([(i, login(k)) for k, i in enumerate(ids)])[0] == [1] * 12
    done = store.claim(APP, 2)
    assert done.batch_id is not None
    store.complete(done.batch_id, [{"id": i.id, "state": "succeeded"} for i in done.items],
                   calls=1, items_sent=5, operator_type=2)
    in_flight = store.claim(APP, 2)  # a batch whose call is still out when the move starts
    assert in_flight.batch_id is not None
    slot = cclient.keyslot(store.scope(APP).counters)
    source = redis_cluster.port_of_slot(slot)
    target = next(p for p in redis_cluster.ports if p != source)

    result: list[MoveReport] = []
    mover = threading.Thread(target=lambda: result.append(
        move_app(store, APP, f"127.0.0.1:{target}", timeout_s=60)))
    mover.start()
    wait_until(lambda: store.pauses([APP]).get(APP, (0, ""))[1] == MOVING, 30,
               message="the app held for the move")
    # held: an enqueue writes nothing (safe to send again), a claim finds the app paused
    with pytest.raises(AppMovingError):
        store.enqueue([(f"{APP}.late", login(99))])
    assert store.claim(APP, 2).kind == "paused"
    assert mover.is_alive()  # it waits for the batch in flight
    store.complete(in_flight.batch_id, [{"id": i.id, "state": "succeeded"}
                                        for i in in_flight.items],
                   calls=1, items_sent=5, operator_type=2)
    mover.join(60)
    assert not mover.is_alive() and result
    report = result[0]
    assert (report.slot, report.source, report.target) == (
        slot, f"127.0.0.1:{source}", f"127.0.0.1:{target}")
    assert report.keys > 12 and report.stalled_s >= report.waited_in_flight_s > 0

    assert redis_cluster.port_of_slot(slot) == target
    # nothing of the moved slot left behind (keys outside it, as the app registry ``apps``,
    # live wherever the random prefix hashes them: on the source a third of the time)
    assert not [k for k in redis_cluster.node(source).keys(f"{cluster_prefix}*")
                if cclient.keyslot(k) == slot]
    # resumed on the new master with everything: records, queue, counters; writes go there
    assert APP not in store.pauses([APP])
    states = [s.state if s else None for s in store.statuses(ids)]
    assert states == ["succeeded"] * 10 + ["queued"] * 2
    assert store.enqueue([(f"{APP}.late", login(99))])[0] == [1]
    rest = store.claim(APP, 2)
    assert [i.id for i in rest.items] == [ids[10], ids[11], f"{APP}.late"]
    assert store.counters()["succeeded:2"] == 10


def test_a_move_names_a_bad_target(cclient: RedisCluster, cluster_prefix: str) -> None:
    store = Store(cclient, cluster_prefix)
    with pytest.raises(ConfigError, match="not a master of the cluster"):
        move_app(store, APP, "127.0.0.1:1")


def test_the_move_app_command_moves_and_says_how_long_the_app_stalled(
        redis_cluster: LocalCluster, redis_url: str, cclient: RedisCluster, cluster_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = "mover-cli"
    for name, value in {"REDIS_URL": redis_cluster.url, "CELERY_BROKER_URL": redis_url,
                        "TPNS_REDIS_PREFIX": cluster_prefix, "TPNS_APPS": app,
                        "TPNS_BASE_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TPNS_CONFIG_FILE", raising=False)
    store = Store(cclient, cluster_prefix)
    store.enqueue([(f"{app}.1", Intent(4, "tok", (), app))])
    slot = cclient.keyslot(store.scope(app).counters)
    target = next(p for p in redis_cluster.ports if p != redis_cluster.port_of_slot(slot))
    done = CliRunner().invoke(main, ["move-app", app, "--to", f"127.0.0.1:{target}"],
                              catch_exceptions=False)
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["target"] == f"127.0.0.1:{target}" and report["keys"] >= 2
    assert report["stalled_s"] >= 0
    assert redis_cluster.port_of_slot(slot) == target
    refused = CliRunner().invoke(main, ["move-app", "nope", "--to", f"127.0.0.1:{target}"])
    assert refused.exit_code != 0 and "app 'nope' is not known" in refused.output
