"""The memory phase of ``tpns-batcher bench``: Redis bytes per terminal intent (SPEC §10).

``terminal_memory`` stores N intents of realistic sizes under a fresh prefix of its own, with the
``Store`` directly (no worker, no broker: the figure does not depend on timing), claims them and
completes them all as succeeded with ``status_detail_s=0``, which is the state of every succeeded
intent once its detail period has passed: the whole record gone, its summary (``P c:…``) and the
history index (``P h:…``) left. ``used_memory`` is read before and after, client buffers (ours and
other clients', transient) left out of both readings; the events stream is a fixed cost (capped at
``TPNS_EVENTS_MAXLEN``), so its ``MEMORY USAGE`` is taken out of the figure and reported on its
own. Every key under the prefix is then deleted, and no other.

Intents: 64-hex tokens, e-mail accounts (``user00000001@example.com``), operator types 1, 2 and 3
in the proportions of the benchmark's mix (5 : 55 : 20), each with its own token and account (no
chains). On a shared server (``REDIS_URL``) the delta also holds whatever other clients wrote
meanwhile; on the benchmark's private Redis it is the phase's alone.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from ..bulk import new_id
from ..connections import redis_client
from ..intents import validate
from ..model import Intent
from ..store import Store
from ..store_calls import SCRIPTS, Claim, load_script
from .stack import delete_prefix, keys_under

#: the app the phase's intents belong to (any name: no app list is consulted)
APP = "default"
#: operator types of the phase and their weights (the benchmark's mix without ops 4 and 5)
OPERATORS = ((1, 5), (2, 55), (3, 20))
#: claims per round trip
CLAIMS_PER_CALL = 50
#: SPEC §10's memory targets, every per-intent index included (history by key too); terminal:
#: after the detail period, the events stream apart
MEMORY_TARGETS = {"redis_bytes_per_pending_intent_max": 450.0,
                  "redis_bytes_per_terminal_intent_max": 150.0}


@dataclass(frozen=True)
class MemoryFigures:
    """What the phase measured: bytes per terminal intent (events stream excluded), the events
    stream's bytes per intent, and how many intents it stored."""

    intents: int
    terminal_bytes: float
    events_bytes: float

    def as_results(self) -> dict[str, float]:
        return {"redis_bytes_per_terminal_intent": round(self.terminal_bytes, 1),
                "redis_events_bytes_per_intent": round(self.events_bytes, 1)}


#: intents of the memory phase, whatever the run's ``--intents``: per-intent figures from a few
#: hundred intents are noise (a resize of the server's key table moves ``used_memory`` by more
#: than they hold), and a fixed count keeps runs comparable; a few seconds
MEMORY_INTENTS = 20_000


def memory_figures(redis_url: str, count: int = MEMORY_INTENTS) -> dict[str, float]:
    """``terminal_memory`` of ``count`` intents on the server at ``redis_url``, as the benchmark
    reports it."""
    client = redis_client(redis_url)  # any REDIS_URL form (Sentinel, TLS), not only redis://
    try:
        return terminal_memory(client, fresh_prefix(), count).as_results()
    finally:
        client.close()


def memory_met(results: dict[str, Any]) -> dict[str, bool]:
    """Whether the run's memory figures meet ``MEMORY_TARGETS``."""
    return {key[:-4]: results[key[:-4]] <= goal for key, goal in MEMORY_TARGETS.items()}


def memory_intents(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` intents of ops 1-3, each with its own 64-hex token and e-mail account."""
    ops = rng.choices([op for op, _ in OPERATORS], [w for _, w in OPERATORS], k=count)
    return [{"operator_type": op, "token": f"{rng.getrandbits(256):064x}",
             "account_list": [{"account": f"user{k + 1:08d}@example.com", "account_type": 1005}]}
            for k, op in enumerate(ops)]


def fresh_prefix() -> str:
    """A key prefix nobody else uses, for one memory phase."""
    return f"tpns-mem-{uuid.uuid4().hex[:8]}:"


def terminal_memory(client: redis.Redis, prefix: str, count: int,
                    seed: int = 4) -> MemoryFigures:
    """Store, claim and complete ``count`` intents under ``prefix`` (which must hold no key),
    measure, and delete every key under ``prefix`` (also when the phase fails)."""
    if count < 1:
        raise ValueError(f"count: must be at least 1, got {count}")
    if next(keys_under(client, prefix), None) is not None:
        raise ValueError(f"prefix: must hold no key, {prefix!r} does")
    store = Store(client, prefix, linger_ms=0, status_detail_s=0)
    pairs: list[tuple[str, Intent]] = [(new_id(), validate(obj, None, APP))
                                       for obj in memory_intents(count, random.Random(seed))]
    try:
        for name in SCRIPTS:  # loaded now, so that the script cache is not counted
            client.script_load(load_script(name))
        before = data_memory(client)
        codes, _wakes = store.enqueue(pairs)  # no wake is sent: nothing consumes them
        if codes.count(1) != count:
            raise RuntimeError(f"memory phase: {count - codes.count(1)} intents not stored")
        completed = sum(complete_all(store, op) for op, _ in OPERATORS)
        if completed != count:
            raise RuntimeError(f"memory phase: {completed} of {count} intents completed")
        after = data_memory(client)
        events = int(client.memory_usage(store.keys.events) or 0)
    finally:
        delete_prefix(client, prefix)
    return MemoryFigures(intents=count, terminal_bytes=(after - before - events) / count,
                         events_bytes=events / count)


def complete_all(store: Store, operator_type: int) -> int:
    """Claim every queued intent of ``operator_type`` and complete it as succeeded; how many."""
    done = 0
    while True:
        batches = [c for c in store.claim_many(APP, operator_type, CLAIMS_PER_CALL)
                   if c.kind == "batch"]
        if not batches:
            return done
        store.complete_many([succeeded(store, claim, operator_type) for claim in batches])
        done += sum(len(claim.items) for claim in batches)


def succeeded(store: Store, claim: Claim, operator_type: int) -> tuple[list[Any], list[Any]]:
    """The ``complete`` call of a batch whose call succeeded for every item."""
    assert claim.batch_id is not None  # a claim of kind "batch" has one
    outcomes = [{"id": item.id, "state": "succeeded", "result_code": 0} for item in claim.items]
    return store.complete_call(claim.batch_id, outcomes, calls=1, items_sent=len(outcomes),
                               operator_type=operator_type, call_metrics=[("ok", 20.0)])


def data_memory(client: redis.Redis) -> int:
    """``used_memory`` without client buffers (query and reply buffers come and go)."""
    info = client.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))
