"""Moving one app's slot to another master of a Redis Cluster (issue 16): a procedure, not
something to survive live.

A script that touches a key already moved off a migrating slot fails mid-way, and Redis keeps the
writes it made before. So nothing of the app may run while its keys move:

1. ``hold``: the app's move flag (``P{app}:move``) makes every ``enqueue.lua`` call of the app
   refuse before writing (the producer answers "store unavailable", not stored, safe to retry),
   and a pause (reason ``moving``) makes every claim and check of it return ``paused``;
2. wait until the app has no batch in flight (its ``leases`` zset is empty): the calls already
   sent finish and record their outcomes;
3. move the slot as ``redis-cli --cluster reshard`` does (``IMPORTING`` on the target,
   ``MIGRATING`` on the source, ``MIGRATE`` of its keys, ``SETSLOT … NODE`` everywhere), with the
   flag and the pause moved last: while they are on the source, scripts of the app run there and
   refuse; once they moved, every key is on the target, and the cluster redirects scripts there;
4. drop the flag and the pause: the app resumes on its new master.

The app stalls (no enqueue, no send) from 1 to 4: the in-flight calls of 2 (at most
``TPNS_HTTP_TIMEOUT_S`` times the retries of a call) plus the copy of its keys in 3 (a few
seconds per 100k intents on a LAN). Other apps never stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster

from .errors import ConfigError
from .store import Store
from .store_calls import as_text

#: the pause's reason while an app's slot moves (what ``stats`` and ``health`` show)
MOVING = "moving"
#: longest a move holds the app (the pause's and the flag's TTL): a move that dies half-way
#: releases the app by itself after this
HOLD_S = 3600
#: keys per MIGRATE call
BATCH = 500


@dataclass(frozen=True)
class MoveReport:
    """What a move did: the slot, from and to which node, the keys moved, the stall."""

    app: str
    slot: int
    source: str
    target: str
    keys: int
    waited_in_flight_s: float
    stalled_s: float


def _node_client(node: Any) -> redis.Redis:
    client: redis.Redis = node.redis_connection
    return client


def _primaries(client: RedisCluster) -> list[Any]:
    nodes: list[Any] = client.get_primaries()  # type: ignore[no-untyped-call]
    return nodes


def _address(node: Any) -> str:
    return f"{node.host}:{node.port}"


def move_app(store: Store, app: str, target: str, *, timeout_s: float = 600.0,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> MoveReport:
    """Move ``app``'s slot to the master at ``target`` (``host:port``), holding the app meanwhile.

    Raises ``ConfigError`` for a store that is not a cluster or a target that is not one of its
    masters, and ``TimeoutError`` when the in-flight batches do not end within ``timeout_s``
    (the app is then released again, nothing moved).
    """
    client = store.redis
    if not isinstance(client, RedisCluster):
        raise ConfigError("REDIS_URL", "moving an app needs a Redis Cluster (redis+cluster://)")
    keys = store.scope(app)
    slot = int(client.keyslot(keys.counters))
    source_node = client.nodes_manager.get_node_from_slot(slot)
    masters = {_address(n): n for n in _primaries(client)}
    if target not in masters:
        raise ConfigError("--to", f"{target} is not a master of the cluster "
                                  f"(masters: {', '.join(sorted(masters))})")
    target_node = masters[target]
    started = clock()
    if _address(source_node) == target:
        return MoveReport(app, slot, target, target, 0, 0.0, 0.0)
    hold = [keys.move(app), keys.pause(app)]
    client.set(keys.move(app), "1", ex=HOLD_S)
    store.pause(app, HOLD_S, MOVING)
    try:
        deadline = clock() + timeout_s
        while client.zcard(keys.leases) > 0:  # batches in flight: let them record outcomes
            if clock() > deadline:
                raise TimeoutError(f"{app}: batches still in flight after {timeout_s:g} s")
            sleep(0.05)
        waited = clock() - started
        moved = _move_slot(client, slot, source_node, target_node, last=hold)
    finally:
        # after a move the client's map is stale until it follows a MOVED: refresh it first
        client.nodes_manager.initialize()
        client.delete(keys.move(app))
        store.resume(app)
    return MoveReport(app, slot, _address(source_node), target, moved, round(waited, 3),
                      round(clock() - started, 3))


def _move_slot(client: RedisCluster, slot: int, source: Any, target: Any,
               last: list[str]) -> int:
    """``slot`` from ``source`` to ``target``, the keys of ``last`` after all others; the number
    of keys moved. Every master learns the new owner."""
    src, dst = _node_client(source), _node_client(target)
    src_id = as_text(src.execute_command("CLUSTER", "MYID"))  # type: ignore[no-untyped-call]
    dst_id = as_text(dst.execute_command("CLUSTER", "MYID"))  # type: ignore[no-untyped-call]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)  # type: ignore[no-untyped-call]
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)  # type: ignore[no-untyped-call]
    moved = 0
    while True:
        found = [as_text(k) for k in src.execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "GETKEYSINSLOT", slot, BATCH * 2) if as_text(k) not in last]
        if not found:
            break
        for start in range(0, len(found), BATCH):
            part = found[start:start + BATCH]
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 10_000,  # type: ignore[no-untyped-call]
                                "REPLACE", "KEYS", *part)
            moved += len(part)
    rest = [k for k in last if src.exists(k)]
    if rest:
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 10_000,  # type: ignore[no-untyped-call]
                            "REPLACE", "KEYS", *rest)
        moved += len(rest)
    # the target first (it then owns the slot), then the source, then the other masters
    for node in [target, source, *(n for n in _primaries(client)
                                   if n.name not in (target.name, source.name))]:
        _node_client(node).execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    return moved
