"""End to end with TPNS_VERIFY=on (issue 15): real worker processes against a sandbox that applies
accepted calls late (``apply_delay_ms``) and loses some of them (the ``lost`` fault).

Judged as in test_worker_e2e: the final bindings equal the sequential model of the intents and
per-key order holds; and here also every succeeded intent is verified, lost calls were sent
again, and no intent held its keys longer than the bound the README states.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest

from tests.support.polling import wait_until
from worker.model import Status
from worker.producer import Producer
from worker.sandbox.protocol import Item
from worker.sandbox.server import SandboxServer

from .conftest import MakeProducer, StartWorker
from .test_worker_e2e import (
    _accounts,
    _keys,
    assert_sandbox_matches_model,
    contended_intents,
    mixed_intents,
    per_key_sequences,
    submit,
    wait_all_terminal,
)

pytestmark = pytest.mark.e2e

VERIFY_ENV = {"TPNS_VERIFY": "on", "TPNS_VERIFY_DELAY_MS": "100", "TPNS_VERIFY_TIMEOUT_S": "1",
              "TPNS_LOG_FORMAT": "json"}
#: product_env's lease (the check's lease too) and the sweep's period, seconds
LEASE_S, SWEEP_S = 3.0, 1.0


def _ms(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000


def key_hold_bound_s(attempts: int, timeout_s: float) -> float:
    """The README's bound on how long an intent holds its keys once nothing is ahead of it: per
    attempt a call (within its lease), a verification (the timeout, plus one check within its
    lease), and the backoff before the next attempt (``min(2**n, 300)`` s); plus the sweep's
    period for each wake that may be late."""
    per_attempt = [LEASE_S + timeout_s + LEASE_S + min(2 ** n, 300) + 2 * SWEEP_S
                   for n in range(1, attempts + 1)]
    return sum(per_attempt)


def assert_keys_held_within_the_bound(intents: Sequence[dict[str, Any]],
                                      statuses: Sequence[Status | None]) -> float:
    """For each intent: from when it could go (enqueued, and every earlier intent on its keys
    final) to when it was final, within ``key_hold_bound_s``; returns the longest hold."""
    final_at: dict[tuple[Any, ...], float] = {}
    longest = 0.0
    for intent, status in zip(intents, statuses, strict=True):
        assert status is not None and status.terminal
        keys = _keys(intent["operator_type"], intent.get("token"), _accounts(intent))
        start = max([_ms(status.created_at), *(final_at.get(k, 0.0) for k in keys)])
        done = _ms(status.updated_at)
        held_s = (done - start) / 1000
        assert held_s <= key_hold_bound_s(status.attempts, 1.0), (intent, status)
        longest = max(longest, held_s)
        for key in keys:
            final_at[key] = done
    return longest


def assert_per_key_order_in_order(applied: Sequence[tuple[int, Item]],
                                  intents: Sequence[dict[str, Any]]) -> int:
    """Per key, the items the sandbox applied are the intents on that key in enqueue order, an
    item sent again right after itself counting once, never one out of order or unasked for.
    Unlike without verification an intent may be missing: its call was lost, and its check saw
    the state it asked for anyway (a no-op where it stood, or made so by an intent on its other
    keys that ran alongside, e.g. an override of the same token); the final state is checked
    apart. Returns how many intents are missing."""
    expected, seen = per_key_sequences(applied, intents)
    missing = 0
    for key in expected.keys() | seen.keys():
        got, at = seen.get(key, []), 0
        for signature in expected.get(key, []):
            if at < len(got) and got[at] == signature:
                while at < len(got) and got[at] == signature:  # sent again: one entry
                    at += 1
            else:
                missing += 1
        assert at == len(got), (f"{key}: applied {got[at:]} out of order or never enqueued; "
                                f"enqueued {expected.get(key)}")
    return missing


def assert_all_verified(producer: Producer, ids: Sequence[str]) -> list[Status | None]:
    statuses = producer.statuses(ids)
    wrong = [s for s in statuses if s is None or (s.state, s.verified) != ("succeeded", True)]
    assert not wrong, f"{len(wrong)} not succeeded and verified, e.g. {wrong[0]}"
    return statuses


def test_late_and_lost_calls_end_in_the_sequential_state_all_verified(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    sandbox.configure(apply_delay_ms=150, fault_rate=0.15, faults=["lost"], seed=5)
    intents = mixed_intents(200, tokens=30, accounts=30, seed=7) + \
        contended_intents(24, tokens=3, accounts=3, seed=8)
    producer = make_producer()
    start_worker(sandbox, **VERIFY_ENV)
    ids = submit(producer, intents)

    wait_all_terminal(producer, len(intents), 120)

    statuses = assert_all_verified(producer, ids)
    assert_sandbox_matches_model(sandbox, intents)
    missing = assert_per_key_order_in_order(sandbox.applied(), intents)
    lost = sandbox.stats()["faults"].get("lost", 0)
    assert missing <= 20 * lost * 3  # (an intent has up to 3 keys)
    verify = producer.stats()["verify"]
    assert lost > 0 and verify["retry"] > 0  # lost calls were caught and their items sent again
    assert max(s.attempts for s in statuses if s) >= 2
    assert verify["ok"] == len(intents) and verify["not_applied"] == 0
    assert 0 < verify["query_calls"] and sandbox.stats()["queries"] >= verify["query_calls"]
    assert_keys_held_within_the_bound(intents, statuses)
    stats = producer.stats()
    assert stats["states"]["verifying"] == 0 and stats["queue_depth"] == 0


def test_sigkill_while_verifying_loses_nothing(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    intents = [{"operator_type": 2, "token": f"tok-{k}", "account_list": [{"account": f"u{k}"}]}
               for k in range(40)]
    producer = make_producer()
    # checks start 1 s after the calls: time to hold the sandbox once every item is verifying
    first = start_worker(sandbox, name="w1", **{**VERIFY_ENV, "TPNS_VERIFY_DELAY_MS": "1000",
                                                "TPNS_VERIFY_TIMEOUT_S": "30",
                                                "TPNS_HTTP_TIMEOUT_S": "5",
                                                "TPNS_LEASE_S": "20"})
    ids = submit(producer, intents)
    wait_until(lambda: producer.stats()["states"]["verifying"] == len(intents), 60,
               message="every intent verifying")
    sandbox.hold()
    wait_until(lambda: sandbox.stats()["queries"] > 0, 30, message="a check in flight, held")
    first.kill()
    # the dead check's lease ends now: the clock is ours to move, rather than waiting 20 s
    leases = producer.store.keys.leases
    producer.store.redis.zadd(leases, dict.fromkeys(producer.store.redis.zrange(leases, 0, -1), 0))
    sandbox.release()
    assert producer.stats()["states"]["verifying"] == len(intents)  # keys still held

    start_worker(sandbox, name="w2", **VERIFY_ENV)
    wait_all_terminal(producer, len(intents), 60)

    assert_all_verified(producer, ids)
    assert producer.stats()["leases_reclaimed"] > 0
    assert all(sandbox.bindings_of(f"tok-{k}") == {0: f"u{k}"} for k in range(40))
    # nothing was sent twice: the checks were made again, not the calls
    assert sandbox.stats()["items"] == len(intents)
