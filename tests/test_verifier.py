"""Verification in the worker (``worker/verifier.py``, ``verifying.py``, the Lua scripts) against a
real Redis and the sandbox over a real socket, driven step by step without Celery.

The verifier's clock is injected: "the deadline has passed" is a clock moved forward, not a wait.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests

from tests.support.polling import wait_until
from worker.auth import basic_header
from worker.client import encode_body
from worker.flush import Flusher
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY, Settings
from worker.store import Store, Wake
from worker.tasks import make_store
from worker.verifier import Verifier
from worker.verifying import claim_verify

HOUR_MS = 3_600_000


@dataclass
class Rig:
    producer: Producer
    store: Store
    flusher: Flusher
    verifier: Verifier
    wakes: list[Wake] = field(default_factory=list)
    #: added to the verifier's clock: moves it past deadlines without waiting
    skew_ms: list[int] = field(default_factory=lambda: [0])

    def status(self, intent_id: str) -> tuple[str, bool | None, str | None, int]:
        s = self.producer.status(intent_id)
        assert s is not None
        return s.state, s.verified, s.error, s.attempts


@pytest.fixture
def rig(redis_url: str, prefix: str, sandbox: SandboxServer) -> Iterator[Rig]:
    settings = Settings.from_env({
        "REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix, "TPNS_BASE_URL": sandbox.url,
        "TPNS_VERIFY": "on", "TPNS_VERIFY_DELAY_MS": "0", "TPNS_VERIFY_TIMEOUT_S": "60",
        "TPNS_MAX_ATTEMPTS": "2", "TPNS_HTTP_TIMEOUT_S": "2", "TPNS_LINGER_MS": "0"})
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    store = make_store(settings, redis_url, prefix)
    wakes: list[Wake] = []
    flusher = Flusher(settings, store, wake=wakes.extend, sleep=lambda s: None)
    skew = [0]
    verifier = Verifier(settings, store, wake=wakes.extend, sleep=lambda s: None,
                        now_ms=lambda: int(time.time() * 1000) + skew[0])
    yield Rig(producer, store, flusher, verifier, wakes, skew)
    verifier.close()
    flusher.close()
    producer.close()


def bind(token: str, account: str) -> dict[str, object]:
    return {"operator_type": 2, "token": token, "account_list": [{"account": account}]}


def test_an_accepted_item_holds_its_keys_until_a_query_shows_it(
        rig: Rig, sandbox: SandboxServer) -> None:
    sandbox.configure(apply_delay_ms=HOUR_MS)  # accepted, not applied yet
    first, second = rig.producer.submit_many([bind("t1", "u1"), {"operator_type": 4,
                                                                  "token": "t1"}])
    assert first and second
    assert rig.flusher.flush("default", 2).batches == 1
    assert rig.status(first) == ("verifying", False, None, 1)
    assert Wake("default", 0, "verify") in rig.wakes
    stats = rig.producer.stats()
    assert stats["states"]["verifying"] == 1 and stats["queue_depth"] == 2
    # the unbind waits behind the verifying bind: nothing of op 4 is eligible
    assert rig.flusher.flush("default", 4).batches == 0

    result = rig.verifier.verify("default")  # the query sees the old state: check again later
    assert (result.items, result.verified) == (1, 0)
    assert rig.status(first) == ("verifying", False, None, 1)

    sandbox.configure(apply_delay_ms=0)
    sandbox.reset()  # forget the held-back call; apply the bind for real
    rig.store.redis.zadd(rig.store.keys.verifying("default"), {first: 0})  # due now
    assert rig.verifier.verify("default").verified == 0  # reset: nothing bound, still unseen
    sandbox_bind(sandbox, "t1", "u1")
    rig.store.redis.zadd(rig.store.keys.verifying("default"), {first: 0})
    assert rig.verifier.verify("default").verified == 1
    assert rig.status(first) == ("succeeded", True, None, 1)
    # the key is free: the unbind goes, and is verified in turn
    assert rig.flusher.flush("default", 4).batches == 1
    assert rig.verifier.verify("default").verified == 1
    assert rig.status(second) == ("succeeded", True, None, 1)
    assert sandbox.bindings_of("t1") == {}
    verify = rig.producer.stats()["verify"]
    # op 2 reads the account and the token (2 calls a check, 3 checks), op 4 the token
    assert verify == {"ok": 2, "retry": 0, "not_applied": 0, "query_calls": 7}


def sandbox_bind(sandbox: SandboxServer, token: str, account: str) -> None:
    body = encode_body({"operator_type": 2, "token_accounts": [
        {"token": token, "account_list": [{"account": account}]}]})
    answer = requests.post(sandbox.url + "/v3/device/account/batchoperate", data=body,
                           headers=basic_header(SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY),
                           timeout=5).json()
    assert answer["ret_code"] == 0


def test_a_lost_call_is_sent_again_then_failed_not_applied_and_its_keys_freed(
        rig: Rig, sandbox: SandboxServer) -> None:
    sandbox.configure(fault_rate=1.0, faults=["lost"])
    lost, after = rig.producer.submit_many([bind("t1", "u1"), bind("t1", "u2")])
    assert lost and after
    assert rig.flusher.flush("default", 2).items == 1
    rig.skew_ms[0] = HOUR_MS  # past the deadline
    rig.verifier.verify("default")
    assert rig.status(lost) == ("retrying", False, "not_applied", 1)
    # sent again once its backoff is over (1-2 s), accepted and lost again
    wait_until(lambda: rig.flusher.flush("default", 2).items == 1, 10,
               message="the lost item is sent again")
    assert rig.status(lost) == ("verifying", False, None, 2)
    rig.verifier.verify("default")
    # the retry budget (2 attempts) is spent: failed, and the successor may go
    assert rig.status(lost) == ("failed", False, "not_applied", 2)
    assert sandbox.stats()["faults"] == {"lost": 2} and sandbox.bindings_of("t1") == {}
    sandbox.configure(fault_rate=0.0)
    rig.skew_ms[0] = 0
    assert rig.flusher.flush("default", 2).items == 1
    assert rig.verifier.verify("default").verified == 1
    assert rig.status(after) == ("succeeded", True, None, 1)
    assert sandbox.bindings_of("t1") == {0: "u2"}
    verify = rig.producer.stats()["verify"]
    assert (verify["ok"], verify["retry"], verify["not_applied"]) == (1, 1, 1)
    failed = rig.producer.store.recent_failures()
    assert [s.id for s in failed] == [lost]


def test_a_check_whose_worker_died_is_reaped_and_checked_again(
        rig: Rig, sandbox: SandboxServer, redis_url: str, prefix: str) -> None:
    intent_id, = rig.producer.submit_many([bind("t1", "u1")])
    assert intent_id and rig.flusher.flush("default", 2).batches == 1
    # a worker claims the check and dies: its lease (0.2 s here) runs out
    short = Store(rig.store.redis, prefix, lease_s=0.2)
    claim = claim_verify(short, "default", 20)
    assert claim.kind == "batch" and [i.id for i in claim.items] == [intent_id]
    assert rig.verifier.verify("default").items == 0  # held by the dead check
    wait_until(lambda: rig.store.reap()[0] == 1, 10, message="the dead check's lease reaped")
    assert rig.status(intent_id) == ("verifying", False, None, 1)
    assert rig.verifier.verify("default").verified == 1
    assert rig.status(intent_id) == ("succeeded", True, None, 1)


def test_without_verification_records_say_verified_null(
        redis_url: str, prefix: str, sandbox: SandboxServer) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_BASE_URL": sandbox.url, "TPNS_LINGER_MS": "0"})
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    flusher = Flusher(settings, make_store(settings, redis_url, prefix), wake=lambda w: None)
    try:
        intent_id, = producer.submit_many([bind("t1", "u1")])
        assert intent_id and flusher.flush("default", 2).batches == 1
        status = producer.status(intent_id)
        assert status is not None and status.state == "succeeded"
        assert status.to_dict()["verified"] is None
        assert sandbox.stats()["queries"] == 0
    finally:
        flusher.close()
        producer.close()


def test_verification_shows_in_stats_metrics_and_the_status_page(
        rig: Rig, sandbox: SandboxServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from worker.monitor.metrics import make_registry, render
    from worker.monitor.overview import read_overview
    from worker.serve.page import render_page

    ids = rig.producer.submit_many([bind(f"t{k}", f"u{k}") for k in range(3)])
    assert rig.flusher.flush("default", 2).items == 3
    figures = read_overview(rig.producer.store, ["default"])
    assert figures["states"]["verifying"] == 3 and figures["queue_depth"] == 3
    page = render_page(figures)
    assert '<dd id="verifying">3</dd>' in page and "<th>verifying</th>" in page
    assert rig.verifier.verify("default").verified == 3
    assert all(rig.status(i or "")[:2] == ("succeeded", True) for i in ids)
    text = render(make_registry(rig.producer.store, lambda: ["default"])).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("tpns_verify_total", (("result", "ok"),))] == 3
    assert samples[("tpns_verify_total", (("result", "retry"),))] == 0
    assert samples[("tpns_verify_total", (("result", "not_applied"),))] == 0
    # three binds: three accounts in one query call, three tokens in another
    assert samples[("tpns_query_calls_total", ())] == 2 == sandbox.stats()["queries"]
    assert "seen applied 3, sent again 0, not applied 0, query calls 2" in \
        render_page(read_overview(rig.producer.store, ["default"]))


def test_verifying_items_count_against_max_pending(rig: Rig) -> None:
    first, = rig.producer.submit_many([bind("t1", "u1")])
    assert first and rig.flusher.flush("default", 2).items == 1
    assert rig.status(first)[0] == "verifying"
    # one pending intent (verifying) and a limit of one: the next is refused, nothing stored
    codes, _ = rig.store.enqueue([("i2", rig.producer.validate(bind("t2", "u2")))], max_pending=1)
    assert codes == [-2] and rig.producer.status("i2") is None
    assert rig.verifier.verify("default").verified == 1
    codes, _ = rig.store.enqueue([("i2", rig.producer.validate(bind("t2", "u2")))], max_pending=1)
    assert codes == [1]
