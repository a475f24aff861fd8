"""worker.keys: every key name, TTL and flag written once, and the Lua side fed from it.

The scripts must not spell a key name or a shared constant (a guard over the .lua sources), and
what they write is where ``Keys`` says it is, with the TTL ``keys`` says (against a real Redis).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources

import pytest
import redis

from worker import keys
from worker.model import STATES, Account, Intent
from worker.store import Store

LUA = {p.name: p.read_text(encoding="utf-8")
       for p in resources.files("worker").joinpath("lua").iterdir() if p.name.endswith(".lua")}
#: every key suffix keys.py names (the prefix comes first in every key)
SUFFIXES = [value for name, value in vars(keys).items()
            if name.isupper() and isinstance(value, str) and name != "DEFAULT_PREFIX"
            and not name.endswith("_TASK")]


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[Store]:
    client = redis.Redis.from_url(redis_url)
    yield Store(client, prefix, max_items=3, linger_ms=400, lease_s=30, status_ttl_s=3600)
    client.close()


def test_the_scripts_exist() -> None:
    assert {"lib.lua", "enqueue.lua", "claim.lua", "complete.lua", "reap.lua",
            "requeue_failed.lua", "throttle.lua"} <= set(LUA)


@pytest.mark.parametrize("name", sorted(LUA))
def test_no_script_spells_a_key_name(name: str) -> None:
    # code only: comments may describe the layout
    code = "\n".join(line.split("--", 1)[0] for line in LUA[name].splitlines())
    spelled = [s for s in SUFFIXES if re.search(r"""P\s*\.\.\s*['"]""" + re.escape(s), code)
               or re.search(r"""['"]""" + re.escape(s) + r"""['"]\s*\.\.""", code)]
    assert spelled == []
    assert not re.search(r"P\s*\.\.\s*['\"]", code), "a key built from a literal after P"
    assert str(keys.WAKE_FLAG_MS) not in code
    # the prelude's constants are not declared again (bump()'s counter names may be states)
    redeclared = [c for c in keys.LUA_CONSTANTS if re.search(rf"\b{c}\s*=[^=]", code)]
    assert redeclared == []
    assert "5000, 10000" not in code  # the latency buckets


def test_the_prelude_declares_every_shared_constant() -> None:
    prelude = keys.lua_prelude()
    assert prelude.splitlines()[1] == "local P = ARGV[1]"
    for name in keys.LUA_CONSTANTS:
        assert re.search(rf"^local {name} = ", prelude, re.M), name
    assert f'local K_WAKE = "{keys.WAKE}"' in prelude
    assert f"local WAKE_FLAG_MS = {keys.WAKE_FLAG_MS}" in prelude
    assert "local LAT_BUCKETS = {" + ", ".join(map(str, keys.LATENCY_BUCKETS_MS)) + "}" in prelude


def test_the_prelude_is_valid_lua_with_the_values_of_keys(rconn: redis.Redis) -> None:
    script = keys.lua_prelude() + (
        "return {K_RECORD, K_WAKE_LINGER, WAKE_FLAG_MS, #LAT_BUCKETS, LAT_BUCKETS[#LAT_BUCKETS],"
        " STATE_NAME['ok'], #PENDING_STATES, PENDING_STATES[1], #OPERATOR_TYPES, P}")
    got = rconn.eval(script, 0, "pfx:")
    assert got == [keys.RECORD, keys.WAKE_LINGER, keys.WAKE_FLAG_MS, len(keys.LATENCY_BUCKETS_MS),
                   keys.LATENCY_BUCKETS_MS[-1], "succeeded", 4, "queued", 5, "pfx:"]


def test_record_states_name_every_state() -> None:
    assert sorted(keys.RECORD_STATES.values()) == sorted(STATES)


def test_key_names() -> None:
    k = keys.Keys("p:")
    assert (k.record("x"), k.ready("a", 2), k.delayed("a", 2), k.wake("a", 2),
            k.wake_linger("a", 2), k.pause("a"), k.backoff("a"), k.rate("a"), k.probe("h", 7)) \
        == ("p:i:x", "p:q:a:2", "p:d:a:2", "p:wake:a:2", "p:wakel:a:2", "p:pause:a",
            "p:backoff:a", "p:rate:a", "p:probe:h:7")
    assert (k.counters, k.metrics, k.failed, k.batches, k.leases, k.seq, k.apps, k.workers,
            k.sweep_lock, k.flush_queue, k.celery_prefix) == (
        "p:n", "p:m", "p:failed", "p:batches", "p:leases", "p:seq", "p:apps", "p:workers",
        "p:sweep", "p:flush", "p:celery:")
    assert keys.Keys().prefix == keys.DEFAULT_PREFIX


def test_scripts_write_where_keys_says(store: Store, rconn: redis.Redis) -> None:
    k = store.keys
    intents = [(f"w{n}", Intent(2, f"tok{n}", (Account(f"u{n}"),), "shop")) for n in range(3)]
    codes, wakes = store.enqueue(intents)
    assert codes == [1, 1, 1] and [w.kind for w in wakes] == ["now"]
    assert rconn.exists(k.record("w0")) and rconn.llen(k.ready("shop", 2)) == 3
    assert 0 < rconn.pttl(k.wake("shop", 2)) <= keys.WAKE_FLAG_MS
    assert rconn.hget(k.counters, "queued:2") == "3"
    claim = store.claim("shop", 2)
    assert claim.kind == "batch" and rconn.hexists(k.batches, claim.batch_id or "")
    assert rconn.zscore(k.leases, claim.batch_id or "") is not None
    store.complete(claim.batch_id or "", [{"id": "w0", "state": "failed", "error": "x"},
                                          {"id": "w1", "state": "succeeded"},
                                          {"id": "w2", "state": "succeeded"}],
                   calls=1, items_sent=3, operator_type=2, call_metrics=[("ok", 7.0)])
    assert rconn.zscore(k.failed, "w0") is not None
    assert rconn.hget(k.metrics, "lat:10") == "1"
    assert 0 < rconn.ttl(k.record("w1")) <= 3600


def test_wake_flags_behind_store_methods(store: Store, rconn: redis.Redis) -> None:
    assert store.claim_wake("a", 1) is True
    assert store.claim_wake("a", 1) is False  # one immediate wake per window
    assert 0 < rconn.pttl(store.keys.wake("a", 1)) <= keys.WAKE_FLAG_MS
    store.clear_wake("a", 1)
    assert store.claim_wake("a", 1) is True
    assert store.claim_linger_wake("a", 1, 5000) is True
    assert store.claim_linger_wake("a", 1, 5000) is False
    assert 4000 < rconn.pttl(store.keys.wake_linger("a", 1)) <= 5000


def test_the_lua_and_python_wake_flags_are_one_flag(store: Store) -> None:
    # a full batch's wake from enqueue.lua holds the flag the flush's successor wake asks for
    store.enqueue([(f"f{n}", Intent(4, f"t{n}", (), "b")) for n in range(3)])
    assert store.claim_wake("b", 4) is False


def test_claim_sweep_counts_every_run_and_lets_one_through(store: Store,
                                                          rconn: redis.Redis) -> None:
    assert store.claim_sweep() is True
    assert store.claim_sweep() is False
    assert rconn.hget(store.keys.counters, "sweeps") == "2"
    assert 0 < rconn.pttl(store.keys.sweep_lock) <= keys.SWEEP_LOCK_MS
