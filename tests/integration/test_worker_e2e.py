"""End to end: real ``tpns-batcher worker`` processes drain intents into the sandbox (issue 4).

Each test runs the real worker command (its default pool: one process with many calls in flight,
embedded beat) in its own process
group against the real Redis (the test's prefix) and an in-process sandbox over a real socket.
Correctness is judged against the sandbox, the way TPNS would see it:

* the final bindings equal a plain-Python model that applies the intents one by one in enqueue
  order (``apply_intent``, the binding rules documented in ``worker/sandbox.py``);
* per-key order: for every key (a token, an ``(account, account_type)``), the items the sandbox
  applied, in the order it applied them, are the intents holding that key in enqueue order (an
  item sent twice in a row, after a timeout or a lost lease, is one entry: every op is idempotent).
  An intent sent before its predecessor on a key was final, or a predecessor resent after it, shows
  up as a different sequence.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from tests.support.polling import wait_until
from worker.producer import Producer
from worker.sandbox.auth import SANDBOX_SECRET_KEY
from worker.sandbox.protocol import Item
from worker.sandbox.server import SandboxServer
from worker.tools.stack import WorkerProcess

from .conftest import MakeProducer, StartWorker, product_env
from .helpers import ClaimSeen, assert_flush_rule, claims_in_log

pytestmark = pytest.mark.e2e

ACCOUNT_TYPES = (0, 1005)
FULL = 20
LINGER_MS = int(product_env("", "")["TPNS_LINGER_MS"])

Binding = dict[str, dict[int, str]]
Signature = tuple[int, str | None, tuple[tuple[str, int], ...]]
Key = tuple[str, ...] | tuple[str, str, int]


# -- workloads ----------------------------------------------------------------------------------

def mixed_intents(n: int, tokens: int, accounts: int, seed: int) -> list[dict[str, Any]]:
    """``n`` intents of ops 1-5 (mostly binds) over ``tokens`` tokens and ``accounts`` accounts."""
    rng = random.Random(seed)
    token_names = [f"tok-{k:04d}" for k in range(tokens)]
    account_keys = [(f"user-{k:04d}", ACCOUNT_TYPES[k % 2]) for k in range(accounts)]
    out: list[dict[str, Any]] = []
    for _ in range(n):
        op = rng.choices((1, 2, 3, 4, 5), weights=(3, 3, 2, 1, 1))[0]
        if op == 5:
            account, account_type = rng.choice(account_keys)
            out.append({"operator_type": 5, "account": account, "account_type": account_type})
        elif op == 4:
            out.append({"operator_type": 4, "token": rng.choice(token_names)})
        else:
            picked = rng.sample(account_keys, 2 if op == 1 and rng.random() < 0.3 else 1)
            out.append({"operator_type": op, "token": rng.choice(token_names),
                        "account_list": [{"account": a, "account_type": t} for a, t in picked]})
    return out


def contended_intents(n: int, tokens: int, accounts: int, seed: int) -> list[dict[str, Any]]:
    """Alternating binds (ops 1, 2) and unbinds (ops 3, 4, 5) over very few keys."""
    rng = random.Random(seed)
    token_names = [f"hot-{k:02d}" for k in range(tokens)]
    account_names = [f"acct-{k:02d}" for k in range(accounts)]
    out: list[dict[str, Any]] = []
    for k in range(n):
        token, account = rng.choice(token_names), rng.choice(account_names)
        op = rng.choice((1, 2)) if k % 2 == 0 else rng.choice((3, 3, 4, 5))
        if op == 5:
            out.append({"operator_type": 5, "account": account})
        elif op == 4:
            out.append({"operator_type": 4, "token": token})
        else:
            out.append({"operator_type": op, "token": token,
                        "account_list": [{"account": account}]})
    return out


# -- the sequential model and per-key order -----------------------------------------------------

def _accounts(intent: dict[str, Any]) -> list[tuple[str, int]]:
    if intent["operator_type"] == 5:
        return [(intent["account"], intent.get("account_type", 0))]
    return [(a["account"], a.get("account_type", 0)) for a in intent.get("account_list", [])]


def apply_intent(state: Binding, intent: dict[str, Any]) -> None:
    """One intent's effect on token → {account_type → account}, as the sandbox documents it:
    ops 1 and 2 set ``token[type] = account`` per listed account (a later one of the same type
    wins); op 3 removes a listed account only where it is the one bound; op 4 clears the token;
    op 5 removes the account from every token. ``invalid-`` tokens change nothing."""
    op, token = intent["operator_type"], intent.get("token")
    if token is not None and token.startswith("invalid-"):
        return
    if op == 5:
        ((account, account_type),) = _accounts(intent)
        for bound in state.values():
            if bound.get(account_type) == account:
                del bound[account_type]
    elif op == 4:
        state.pop(token, None)
    else:
        bound = state.setdefault(token, {})
        for account, account_type in _accounts(intent):
            if op in (1, 2):
                bound[account_type] = account
            elif bound.get(account_type) == account:
                del bound[account_type]
    for name in [t for t, b in state.items() if not b]:
        del state[name]


def sequential_model(intents: Iterable[dict[str, Any]]) -> Binding:
    state: Binding = {}
    for intent in intents:
        apply_intent(state, intent)
    return state


def assert_sandbox_matches_model(sandbox: SandboxServer, intents: Sequence[dict[str, Any]]) -> None:
    expected = sequential_model(intents)
    tokens = {i["token"] for i in intents if "token" in i}
    actual = {t: b for t in sorted(tokens) if (b := sandbox.bindings_of(t))}
    wrong = {t: (actual.get(t), expected.get(t)) for t in tokens
             if actual.get(t) != expected.get(t)}
    assert not wrong, f"{len(wrong)} tokens differ (sandbox, model): {dict(list(wrong.items())[:5])}"


def _keys(op: int, token: str | None, accounts: Iterable[tuple[str, int]]) -> list[Key]:
    keys: list[Key] = [] if token is None else [("t", token)]
    if op != 4:
        keys += [("a", a, t) for a, t in dict.fromkeys(accounts)]
    return keys


def _signature(op: int, token: str | None, accounts: Iterable[tuple[str, int]]) -> Signature:
    return op, token, tuple(accounts)


def _runs(sequence: list[Signature]) -> list[Signature]:
    """``sequence`` with consecutive repeats collapsed (a resend of the same intent)."""
    return [s for k, s in enumerate(sequence) if k == 0 or sequence[k - 1] != s]


def per_key_sequences(applied: Sequence[tuple[int, Item]], intents: Sequence[dict[str, Any]]
                      ) -> tuple[dict[Key, list[Signature]], dict[Key, list[Signature]]]:
    """Per key, the signatures of the intents in enqueue order, and of the items the sandbox
    applied in applied order (shared by the order checks with and without verification)."""
    expected: dict[Key, list[Signature]] = defaultdict(list)
    for intent in intents:
        op, token, accounts = intent["operator_type"], intent.get("token"), _accounts(intent)
        for key in _keys(op, token, accounts):
            expected[key].append(_signature(op, token, accounts))
    seen: dict[Key, list[Signature]] = defaultdict(list)
    for op, item in applied:
        accounts = [(a.account, a.account_type) for a in item.accounts]
        for key in _keys(op, item.token, accounts):
            seen[key].append(_signature(op, item.token, accounts))
    return expected, seen


def assert_per_key_order(applied: Sequence[tuple[int, Item]],
                         intents: Sequence[dict[str, Any]]) -> int:
    """Compare, key by key, what the sandbox applied with the enqueue order; returns the number
    of keys checked."""
    expected, seen = per_key_sequences(
        applied, [i for i in intents  # invalid and rejected tokens are never applied
                  if not i.get("token", "").startswith(("invalid-", "reject-"))])
    bad = [key for key in expected.keys() | seen.keys()
           if _runs(expected.get(key, [])) != _runs(seen.get(key, []))]
    assert not bad, (f"per-key order broken on {len(bad)} keys, e.g. {bad[0]}:\n"
                     f"enqueued {_runs(expected.get(bad[0], []))}\n"
                     f"applied  {_runs(seen.get(bad[0], []))}")
    return len(expected)


# -- waiting on the store -------------------------------------------------------------------------

def submit(producer: Producer, intents: Sequence[dict[str, Any]]) -> list[str]:
    """Enqueue (real Celery wakes go to the workers' queue); every intent must be accepted."""
    ids = producer.submit_many(intents)
    accepted = [i for i in ids if i is not None]
    assert len(accepted) == len(intents), "an intent was refused at enqueue"
    return accepted


def terminal_count(producer: Producer) -> int:
    counters = producer.store.counters()
    return sum(counters.get(f"{state}:{op}", 0) for state in ("succeeded", "failed")
               for op in range(1, 6))


def kill_with_calls_held(producer: Producer, sandbox: SandboxServer, worker: WorkerProcess, *,
                         done: int, in_flight: int) -> None:
    """Once ``done`` intents are terminal, hold the sandbox's answers until ``in_flight`` calls
    wait on it, then SIGKILL ``worker`` (the sandbox stays held: the test releases it)."""
    wait_until(lambda: terminal_count(producer) >= done, 60, message="some intents done")
    held = sandbox.stats()["calls"]
    sandbox.hold()
    wait_until(lambda: sandbox.stats()["calls"] > held
               and sandbox.stats()["in_flight"] >= in_flight,
               60, message="calls in flight, held by the sandbox")
    worker.kill()


def wait_all_terminal(producer: Producer, n: int, timeout_s: float) -> None:
    wait_until(lambda: terminal_count(producer) >= n, timeout_s,
               message=lambda: f"{n} intents terminal; stats: {producer.stats()['states']}")


def assert_all_succeeded(producer: Producer, ids: Sequence[str]) -> None:
    statuses = producer.statuses(ids)
    states: dict[str, int] = defaultdict(int)
    for status in statuses:
        assert status is not None
        states[status.state] += 1
    assert dict(states) == {"succeeded": len(ids)}


def assert_claims_follow_the_flush_rule(*workers: WorkerProcess) -> list[ClaimSeen]:
    """SPEC §3.2 claim by claim, from the workers' JSON logs; returns the claims."""
    return assert_flush_rule([w.log() for w in workers], FULL, LINGER_MS)


# -- the tests ------------------------------------------------------------------------------------

def test_backlog_of_mixed_intents_drains_in_full_calls_to_the_sequential_state(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    intents = mixed_intents(3000, tokens=500, accounts=500, seed=1)
    producer = make_producer()
    ids = submit(producer, intents)  # with no worker running: a backlog

    worker = start_worker(sandbox, TPNS_LOG_FORMAT="json")
    wait_all_terminal(producer, len(intents), 90)

    assert_all_succeeded(producer, ids)
    stats = sandbox.stats()
    assert stats["max_items_per_call"] <= FULL
    assert stats["ret_codes"] == {"0": stats["calls"]}
    # every claim took all it could, and a partial one waited for the linger (SPEC §3.2);
    # with no rejection and no retry, each claim is one call, as the sandbox counted them
    claims = assert_claims_follow_the_flush_rule(worker)
    assert sorted((c.operator_type, c.items) for c in claims) == \
        sorted(sandbox.call_sizes())
    assert any(c.reason == "full" for c in claims) and any(c.reason == "linger" for c in claims)
    assert stats["items"] == len(intents)  # each intent sent once
    assert_sandbox_matches_model(sandbox, intents)
    assert_per_key_order(sandbox.applied(), intents)
    store_stats = producer.stats()
    assert store_stats["queue_depth"] == 0 and store_stats["in_flight"] == 0


def test_transient_faults_lose_nothing_and_converge(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    # most items get through within the in-call retries; the rest come back after the
    # between-calls backoff (1-2 s after a first failed call, 2-4 s after a second)
    sandbox.configure(fault_rate=0.3, slow_ms=1500, seed=11,
                      faults=["http_500", "http_503", "1008004", "1008028", "drop", "timeout"])
    intents = mixed_intents(1000, tokens=300, accounts=300, seed=2)
    producer = make_producer()
    worker = start_worker(sandbox, TPNS_HTTP_TIMEOUT_S="0.5", TPNS_LEASE_S="10",
                          TPNS_LOG_FORMAT="json")
    ids = submit(producer, intents)

    wait_all_terminal(producer, len(intents), 90)

    assert_all_succeeded(producer, ids)
    assert_claims_follow_the_flush_rule(worker)
    faults = sandbox.stats()["faults"]
    assert set(faults) == {"http_500", "http_503", "1008004", "1008028", "drop", "timeout"}
    assert sandbox.stats()["max_items_per_call"] <= FULL
    assert_sandbox_matches_model(sandbox, intents)
    assert_per_key_order(sandbox.applied(), intents)


def test_invalid_tokens_fail_alone_and_a_rejected_call_is_halved_to_the_bad_item(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    binds = [{"operator_type": 2, "token": f"tok-{k:02d}", "account_list": [{"account": f"u{k}"}]}
             for k in range(20)]
    binds[3]["token"], binds[11]["token"] = "invalid-3", "invalid-11"
    unbinds = [{"operator_type": 4, "token": f"tok-{k:02d}"} for k in range(20, 40)]
    unbinds[13]["token"] = "reject-13"
    producer = make_producer()
    bind_ids = submit(producer, binds)
    unbind_ids = submit(producer, unbinds)
    worker = start_worker(sandbox, TPNS_LOG_FORMAT="json")
    wait_all_terminal(producer, 40, 60)
    # a batch's line is logged after its outcomes are stored: wait for both lines
    wait_until(lambda: len(claims_in_log(worker.log())) >= 2, 30, message="both batch lines logged")
    # two full claims; halving the rejected one made smaller calls, not smaller claims
    claims = assert_claims_follow_the_flush_rule(worker)
    assert sorted((c.operator_type, c.items, c.reason) for c in claims) == \
        [(2, FULL, "full"), (4, FULL, "full")]

    for k, status in enumerate(producer.statuses(bind_ids)):
        assert status is not None
        if k in (3, 11):
            assert (status.state, status.result_code, status.error) == \
                ("failed", "1008006", "invalid_token")
        else:
            assert (status.state, status.result_code) == ("succeeded", "0")
            assert sandbox.bindings_of(f"tok-{k:02d}") == {0: f"u{k}"}
    for k, status in enumerate(producer.statuses(unbind_ids)):
        assert status is not None
        if k == 13:
            assert (status.state, status.error, status.ret_code) == \
                ("failed", "rejected:1008007", 1008007)
        else:
            assert status.state == "succeeded", status
    # one call of 20 for the binds (1008026: 2 items failed); the unbinds: 20, then halves down
    # to the bad item (index 13), only the halves holding it split again: 20 -> 10 + 10,
    # 10 -> 5 + 5, 5 -> 3 + 2, 2 -> 1 + 1: five rejected calls, four accepted ones
    sizes = [n for op, n in sandbox.call_sizes() if op == 4]
    assert sizes[0] == FULL and sorted(sizes) == sorted([20, 10, 10, 5, 5, 3, 2, 1, 1])
    assert sandbox.stats()["ret_codes"]["1008007"] == 5
    assert [n for op, n in sandbox.call_sizes() if op == 2] == [FULL]
    assert producer.stats()["states"]["failed"] == 3


def test_credentials_failure_pauses_without_failing_anything_and_resumes_when_fixed(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    sandbox.configure(secret_key="other-secret")  # the worker signs with the sandbox's default
    producer = make_producer()
    ids = submit(producer, [{"operator_type": 2, "token": f"tok-{k}",
                             "account_list": [{"account": f"u{k}"}]} for k in range(30)])
    worker = start_worker(sandbox, TPNS_PAUSE_S="2", TPNS_LOG_FORMAT="json")

    def paused_and_all_queued() -> bool:
        stats = producer.stats()
        return "default" in stats["paused"] and stats["states"]["queued"] == 30
    wait_until(paused_and_all_queued, 60, message="sending paused, every intent queued")
    assert producer.stats()["paused"]["default"]["reason"].startswith("credentials:1008003")
    assert {s.state for s in producer.statuses(ids) if s is not None} == {"queued"}
    # the pause is retried once it ends, and refused again while the credentials are wrong
    wait_until(lambda: sandbox.stats()["ret_codes"].get("1008003", 0) >= 2, 60,
               message="a second try after the pause")
    assert producer.stats()["states"]["failed"] == 0

    sandbox.configure(secret_key=SANDBOX_SECRET_KEY)
    wait_all_terminal(producer, 30, 60)
    assert_all_succeeded(producer, ids)
    # a refused call does not spend an attempt: each intent was in one accepted call
    assert {s.attempts for s in producer.statuses(ids) if s is not None} == {1}
    assert all(sandbox.bindings_of(f"tok-{k}") == {0: f"u{k}"} for k in range(30))
    assert_claims_follow_the_flush_rule(worker)


def test_sigkill_mid_run_loses_nothing_after_a_restart(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    intents = mixed_intents(1000, tokens=300, accounts=300, seed=3)
    producer = make_producer()
    ids = submit(producer, intents)
    # a timeout and a lease far longer than the test: a call held by the sandbox stays in flight
    first = start_worker(sandbox, name="w1", TPNS_LOG_FORMAT="json", TPNS_HTTP_TIMEOUT_S="30",
                         TPNS_LEASE_S="120")
    # several calls in flight from the one worker process when it dies
    kill_with_calls_held(producer, sandbox, first, done=100, in_flight=3)
    assert producer.stats()["in_flight"] > 0  # the killed worker's batches are left 'sending'
    # their leases end now: the clock is ours to move, rather than waiting 120 s
    leases = producer.store.key("leases")
    producer.store.redis.zadd(leases, dict.fromkeys(producer.store.redis.zrange(leases, 0, -1), 0))
    sandbox.release()

    second = start_worker(sandbox, name="w2", TPNS_LOG_FORMAT="json")
    wait_all_terminal(producer, len(intents), 90)

    assert_all_succeeded(producer, ids)
    assert producer.stats()["leases_reclaimed"] > 0
    # the killed worker's claims, and the survivor's (which include the reclaimed items)
    assert_claims_follow_the_flush_rule(first, second)
    assert_sandbox_matches_model(sandbox, intents)
    assert_per_key_order(sandbox.applied(), intents)


def test_warm_shutdown_finishes_the_calls_in_flight_and_records_them(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    sandbox.hold()  # the calls stay in flight until released (the worker's timeout is 30 s)
    producer = make_producer()
    ids = submit(producer, [{"operator_type": 2, "token": f"tok-{k}",
                             "account_list": [{"account": f"u{k}"}]} for k in range(400)])
    # one worker process (the default pool) with 6 call slots, and 20 batches waiting
    worker = start_worker(sandbox, TPNS_MAX_IN_FLIGHT="6", TPNS_LEASE_S="120",
                          TPNS_HTTP_TIMEOUT_S="30")
    wait_until(lambda: sandbox.stats()["in_flight"] == 6, 60, message="six calls in flight")
    assert producer.stats()["in_flight"] == 6 * FULL  # no batch claimed without a free slot
    worker.terminate()
    # the worker has taken the shutdown in (no flush claims again) before the calls end
    wait_until(lambda: "claim no more" in worker.log(), 60, message="the shutdown under way")
    sandbox.release()
    assert worker.wait_exit(60) == 0

    # the six calls in flight were finished and recorded; no further batch was claimed
    stats = producer.stats()
    assert sandbox.stats()["calls"] == 6 and sandbox.stats()["in_flight_max"] == 6
    assert stats["states"]["succeeded"] == 6 * FULL and stats["states"]["queued"] == 400 - 6 * FULL
    assert stats["in_flight"] == 0 and stats["leases_reclaimed"] == 0
    assert producer.store.redis.zcard(producer.store.key("leases")) == 0
    statuses = [s for s in producer.statuses(ids) if s is not None]
    succeeded = [s for s in statuses if s.state == "succeeded"]
    assert all(sandbox.bindings_of(s.token or "") == {0: s.account_list[0]["account"]}
               for s in succeeded)
    assert "Warm shutdown" in worker.log() and "reclaimed" not in worker.log()


def test_two_workers_keep_per_key_order_under_heavy_contention(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer) -> None:
    # 1,000 intents on 30 keys: ~33 a key, every batch contended, half sent while both drain
    intents = contended_intents(1000, tokens=20, accounts=10, seed=5)
    producer = make_producer()
    ids = submit(producer, intents[:500])
    workers = [start_worker(sandbox, name=name, TPNS_LOG_FORMAT="json") for name in ("w1", "w2")]
    ids += submit(producer, intents[500:])  # while both drain

    wait_all_terminal(producer, len(intents), 90)

    assert_all_succeeded(producer, ids)
    assert_claims_follow_the_flush_rule(*workers)
    assert_sandbox_matches_model(sandbox, intents)
    assert assert_per_key_order(sandbox.applied(), intents) == 30
    # terminal times follow enqueue order along every key
    statuses = producer.statuses(ids)
    last: dict[Key, tuple[str, str]] = {}
    for intent, status in zip(intents, statuses, strict=True):
        assert status is not None
        for key in _keys(intent["operator_type"], intent.get("token"), _accounts(intent)):
            if key in last:
                assert last[key][0] <= status.updated_at, (key, last[key][1], status.id)
            last[key] = (status.updated_at, status.id)

