"""Property tests of the store against a real Redis: random sequences of enqueue, claim, complete
(success, failure, retry), lease expiry, stale completions and requeues, with few tokens and
accounts so that keys collide. After every step the invariants of SPEC §3 must hold."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.support.fuzz import examples
from worker.model import Account, Intent
from worker.store import Store

TOKENS = ["t0", "t1", "t2", "t3"]
ACCOUNTS = [("a0", 0), ("a1", 0), ("a1", 1005), ("b@x.io", 1005)]
MAX_ITEMS = 3

accounts_st = st.lists(st.sampled_from(ACCOUNTS), min_size=1, max_size=2, unique=True)


@st.composite
def intents(draw: st.DrawFn) -> Intent:
    op = draw(st.integers(1, 5))
    app = draw(st.sampled_from(["default", "ios"]))
    if op == 5:
        acc = draw(st.sampled_from(ACCOUNTS))
        return Intent(5, None, (Account(*acc),), app)
    token = draw(st.sampled_from(TOKENS))
    if op == 4:
        return Intent(4, token, (), app)
    return Intent(op, token, tuple(Account(*a) for a in draw(accounts_st)), app)


def keys_of(intent: Intent) -> set[tuple[str, ...]]:
    keys: set[tuple[str, ...]] = set()
    if intent.token is not None:
        keys.add((intent.app, "t", intent.token))
    for acc in intent.accounts:
        keys.add((intent.app, "a", acc.account, str(acc.account_type)))
    return keys


@dataclass
class Tracked:
    intent: Intent
    seq: int
    state: str = "queued"
    batch: str | None = None


@dataclass
class LiveBatch:
    batch_id: str
    ids: list[str]
    reaped: bool = False
    done: bool = field(default=False)


class StoreMachine(RuleBasedStateMachine):
    #: set by the test to the session's Redis
    redis_url = ""
    batches = Bundle("batches")

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"tpnstest:{uuid.uuid4().hex[:10]}:"
        self.redis = redis.Redis.from_url(self.redis_url)
        self.store = Store(self.redis, self.prefix, max_items=MAX_ITEMS, linger_ms=0,
                           lease_s=600, status_ttl_s=3600)
        self.model: dict[str, Tracked] = {}
        self.seq = 0
        self.live: dict[str, LiveBatch] = {}

    def teardown(self) -> None:
        try:
            self.drain()
        finally:
            keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
            if keys:
                self.redis.delete(*keys)
            self.redis.close()

    # -- rules ---------------------------------------------------------------------------

    @rule(new=st.lists(intents(), min_size=1, max_size=6))
    def enqueue(self, new: list[Intent]) -> None:
        pairs = [(uuid.uuid4().hex[:12], it) for it in new]
        codes, _ = self.store.enqueue(pairs)
        assert codes == [1] * len(pairs)
        for intent_id, it in pairs:
            self.seq += 1
            self.model[intent_id] = Tracked(it, self.seq)

    @rule(intent=intents())
    def enqueue_same_id_twice(self, intent: Intent) -> None:
        intent_id = uuid.uuid4().hex[:12]
        codes, _ = self.store.enqueue([(intent_id, intent), (intent_id, intent)])
        assert codes == [1, 0]
        self.seq += 1
        self.model[intent_id] = Tracked(intent, self.seq)
        other = Intent(4, "t-other", (), intent.app) if intent.operator_type != 4 else Intent(
            4, "t-else", (), intent.app)
        assert self.store.enqueue([(intent_id, other)])[0] == [-1]

    @rule(target=batches, op=st.integers(1, 5), app=st.sampled_from(["default", "ios"]))
    def claim(self, op: int, app: str) -> str:
        claim = self.store.claim(app, op)
        if claim.kind != "batch":
            assert claim.kind == "empty"
            # nothing eligible: every queued intent of (app, op) must be waiting on a key
            for tracked in self.model.values():
                it = tracked.intent
                if (tracked.state == "queued" and it.operator_type == op and it.app == app):
                    assert self.blocked(tracked), "an eligible intent was not claimed"
            return "none"
        ids = [item.id for item in claim.items]
        # SPEC §3.2 with no linger: a claim takes every eligible item up to MAX_ITEMS, and
        # reports how many were eligible (the model counts them on its own)
        eligible = sum(1 for t in self.model.values()
                       if t.state == "queued" and t.intent.operator_type == op
                       and t.intent.app == app and not self.blocked(t))
        assert claim.eligible == eligible, (claim.eligible, eligible)
        assert len(ids) == min(eligible, MAX_ITEMS)
        assert claim.reason == ("full" if eligible >= MAX_ITEMS else "linger")
        idents = [self.model[i].intent.token or self.model[i].intent.accounts[0] for i in ids]
        assert len(set(idents)) == len(idents), "a call names a token/account twice"
        for item in claim.items:
            tracked = self.model[item.id]
            assert tracked.intent.operator_type == op and tracked.intent.app == app
            assert tracked.state == "queued", f"claimed a {tracked.state} intent"
            assert not self.blocked(tracked), "per-key order broken: an earlier intent is pending"
            tracked.state, tracked.batch = "sending", claim.batch_id
        for other in self.live.values():
            if not other.done and not other.reaped:
                assert not set(other.ids) & set(ids), "an item is in two live batches"
        assert claim.batch_id is not None
        self.live[claim.batch_id] = LiveBatch(claim.batch_id, ids)
        return claim.batch_id

    @rule(batch_id=batches, data=st.data())
    def complete(self, batch_id: str, data: st.DataObject) -> None:
        batch = self.live.get(batch_id)
        if batch is None or batch.done:
            return
        outcomes = []
        for intent_id in batch.ids:
            state = data.draw(st.sampled_from(["succeeded", "failed", "retry"]))
            outcomes.append({"id": intent_id, "state": state, "delay_s": 0,
                             "error": None if state == "succeeded" else "x"})
        result = self.store.complete(batch_id, outcomes, calls=1, items_sent=len(outcomes))
        batch.done = True
        applied = 0
        for out in outcomes:
            tracked = self.model[out["id"]]
            if tracked.state == "sending" and tracked.batch == batch_id:
                applied += 1
                tracked.state = {"retry": "retrying"}.get(out["state"], out["state"])
                if tracked.state == "retrying":
                    tracked.state = "queued"  # delay 0: eligible again at the next claim
        assert result.applied == applied
        assert result.stale == len(outcomes) - applied

    @rule(batch_id=batches)
    def expire_lease(self, batch_id: str) -> None:
        batch = self.live.get(batch_id)
        if batch is None or batch.done or batch.reaped:
            return
        # the lease deadline is ours to move: it stands for the clock passing TPNS_LEASE_S
        self.redis.zadd(self.store.key("leases"), {batch_id: 0})
        reclaimed, _ = self.store.reap()
        batch.reaped = True
        expected = [i for i in batch.ids if self.model[i].state == "sending"
                    and self.model[i].batch == batch_id]
        assert reclaimed == len(expected)
        for i in expected:
            self.model[i].state = "queued"

    @rule()
    def requeue_failed(self) -> None:
        ids, _ = self.store.requeue_failed()
        failed = {i for i, t in self.model.items() if t.state == "failed"}
        assert set(ids) == failed
        for i in sorted(ids, key=lambda i: self.model[i].seq):
            self.seq += 1
            self.model[i].state = "queued"
            self.model[i].seq = self.seq

    # -- invariants ----------------------------------------------------------------------

    def blocked(self, tracked: Tracked) -> bool:
        mine = keys_of(tracked.intent)
        return any(
            other.seq < tracked.seq and other.state not in ("succeeded", "failed")
            and keys_of(other.intent) & mine
            for other in self.model.values())

    @invariant()
    def states_match_the_model(self) -> None:
        ids = list(self.model)
        for intent_id, status in zip(ids, self.store.statuses(ids), strict=True):
            assert status is not None, "an accepted intent disappeared"
            expected = self.model[intent_id].state
            # a retried item is 'retrying' in Redis until a claim promotes it to 'queued'
            if expected == "queued" and status.state == "retrying":
                continue
            assert status.state == expected, (intent_id, status.state, expected)

    @invariant()
    def counters_equal_a_recount(self) -> None:
        counters = self.store.counters()
        recount: dict[str, int] = {}
        for status in self.store.statuses(list(self.model)):
            assert status is not None
            key = f"{status.state}:{status.operator_type}"
            recount[key] = recount.get(key, 0) + 1
        for state in ("queued", "sending", "retrying", "succeeded", "failed"):
            for op in range(1, 6):
                key = f"{state}:{op}"
                assert counters.get(key, 0) == recount.get(key, 0), key

    # -- the end: everything completes ----------------------------------------------------

    def drain(self) -> None:
        for _ in range(10_000):
            progressed = False
            for app in ("default", "ios"):
                for op in range(1, 6):
                    claim = self.store.claim(app, op)
                    if claim.kind == "batch":
                        progressed = True
                        for item in claim.items:
                            assert not self.blocked_now(item.id), "order broken while draining"
                        self.store.complete(claim.batch_id or "", [
                            {"id": i.id, "state": "succeeded"} for i in claim.items],
                            calls=1, items_sent=len(claim.items))
                        for item in claim.items:
                            self.model[item.id].state = "succeeded"
            if not progressed:
                break
        live = [b for b in self.live.values() if not b.done and not b.reaped]
        for batch in live:  # batches claimed but never completed: their leases expire
            self.redis.zadd(self.store.key("leases"), {batch.batch_id: 0})
        if live:
            self.store.reap()
            for tracked in self.model.values():
                if tracked.state == "sending":
                    tracked.state = "queued"
            for b in live:
                b.reaped = True
            return self.drain()
        statuses = self.store.statuses(list(self.model))
        assert all(s is not None and s.terminal for s in statuses), "not every intent is terminal"
        return None

    def blocked_now(self, intent_id: str) -> bool:
        return self.blocked(self.model[intent_id])


@pytest.mark.timeout(600)
def test_store_keeps_its_guarantees_under_any_sequence(redis_url: str) -> None:
    machine = type("StoreMachineHere", (StoreMachine,), {"redis_url": redis_url})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=examples(30, 300), stateful_step_count=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]))
