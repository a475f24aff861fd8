"""The outcome rules of SPEC §6: table-driven over a scripted ``client_call``, plus the sandbox."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from requests.adapters import BaseAdapter

from worker import tpns_codes
from worker.client import TpnsClient
from worker.errors import (
    BadResponseError,
    CredentialsError,
    HttpStatusError,
    RateLimitedError,
    RejectedError,
    ServiceError,
    TpnsError,
    TransportError,
    UnexpectedRetCodeError,
)
from worker.model import Account, BatchItem
from worker.outcomes import (
    BatchReport,
    ItemOutcome,
    call_class,
    retry_delay_s,
    retry_or_exhausted,
    run_batch,
)
from worker.sandbox.server import SandboxServer
from worker.settings import AppConfig
from worker.tpns_codes import CallResult

NOW_MS = 1_700_000_000_000
MAX_ATTEMPTS = 8
MAX_AGE_S = 86400.0


def item(n: int, *, attempts: int = 1, age_s: float = 10.0, token: str | None = None) -> BatchItem:
    return BatchItem(id=f"i{n}", token=token or f"t{n}", accounts=(Account(f"u{n}"),),
                     attempts=attempts, created_at_ms=NOW_MS - int(age_s * 1000))


def accepted(ret_code: int, *codes: str, err_msg: str = "NO_ERROR") -> CallResult:
    return CallResult(ret_code, err_msg, tuple(codes), 200, 1, 5.0)


def rejected(ret_code: int = 1008007) -> RejectedError:
    return RejectedError("rejected", code=f"rejected:{ret_code}", ret_code=ret_code,
                         http_status=200, err_msg="invalid parameter")


def credentials(ret_code: int = 1008003) -> CredentialsError:
    return CredentialsError("auth", code=f"credentials:{ret_code}", ret_code=ret_code,
                            http_status=200, err_msg="auth failure")


Answer = CallResult | TpnsError | Callable[[Sequence[BatchItem]], CallResult | TpnsError]


@dataclass
class Script:
    """A ``client_call`` that plays answers in order (the last one repeats) and records calls."""

    answers: list[Answer]
    sent: list[list[str]] = field(default_factory=list)

    def __call__(self, operator_type: int, items: Sequence[BatchItem]) -> CallResult:
        assert 1 <= len(items) <= 20
        self.sent.append([i.id for i in items])
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer) and not isinstance(answer, CallResult | TpnsError):
            answer = answer(items)
        if isinstance(answer, TpnsError):
            raise answer
        return answer


def run(script: Script | Callable[[int, Sequence[BatchItem]], CallResult],
        items: Sequence[BatchItem], seed: int = 1) -> BatchReport:
    return run_batch(script, 2, items, now_ms=NOW_MS, max_attempts=MAX_ATTEMPTS,
                     max_age_s=MAX_AGE_S, rng=random.Random(seed))


def brief(outcome: ItemOutcome) -> tuple[str, str | None, str | None]:
    return outcome.state, outcome.error, outcome.result_code


# -- one call, every row of SPEC §6 -----------------------------------------------------------

CASES: list[tuple[str, Answer, int, list[tuple[str, str | None, str | None]]]] = [
    ("all ok", accepted(0, "0", "0", "0"), 3,
     [("succeeded", None, "0")] * 3),
    ("old ok marker", accepted(0, "ok", "ok"), 2, [("succeeded", None, "ok")] * 2),
    ("partly failed", accepted(1008026, "0", "1008006", "1008029", "10110008", "1008099", "ok"),
     6, [("succeeded", None, "0"), ("failed", "invalid_token", "1008006"),
         ("failed", "invalid_token", "1008029"), ("failed", "no_token_or_account", "10110008"),
         ("retry", "item_1008099", "1008099"), ("succeeded", None, "ok")]),
    ("all failed", accepted(1008027, "1008006", "1008006"), 2,
     [("failed", "invalid_token", "1008006")] * 2),
    ("ret 0, short result", accepted(0, "0"), 3,
     [("succeeded", None, "0"), ("succeeded", None, None), ("succeeded", None, None)]),
    ("ret 0, no result", accepted(0), 2, [("succeeded", None, None)] * 2),
    ("1008026, short result", accepted(1008026, "1008006"), 3,
     [("failed", "invalid_token", "1008006"), ("retry", "no_result", None),
      ("retry", "no_result", None)]),
    ("1008027, no result", accepted(1008027), 1, [("retry", "no_result", None)]),
    ("rate limited", RateLimitedError("429", retry_after_s=7.0, http_status=429), 2,
     [("retry", "rate_limited", None)] * 2),
    ("1008028", RateLimitedError("slow", ret_code=1008028, err_msg="request too fast"), 1,
     [("retry", "rate_limited", None)]),
    ("http 503", HttpStatusError("503", code="http_503", http_status=503), 2,
     [("retry", "http_503", None)] * 2),
    ("1008004", ServiceError("svc", ret_code=1008004, err_msg="invoke service error"), 1,
     [("retry", "service_error", None)]),
    ("timeout", TransportError("t", code="timeout"), 1, [("retry", "timeout", None)]),
    ("dropped", TransportError("d"), 1, [("retry", "connection_error", None)]),
    ("unparseable", BadResponseError("b", http_status=200), 1, [("retry", "bad_response", None)]),
    ("other ret_code", UnexpectedRetCodeError("u", code="ret_1008099", ret_code=1008099,
                                              err_msg="?"), 2,
     [("retry", "ret_1008099", None)] * 2),
    ("single rejected", rejected(1008002), 1, [("failed", "rejected:1008002", None)]),
    ("credentials", credentials(1008030), 3, [("requeue", "credentials:1008030", None)] * 3),
    ("client returned what it should raise", accepted(1008099), 1,
     [("retry", "ret_1008099", None)]),
]


@pytest.mark.parametrize(("answer", "n", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_outcome_rules(answer: Answer, n: int,
                       expected: list[tuple[str, str | None, str | None]]) -> None:
    items = [item(k) for k in range(n)]
    script = Script([answer])
    report = run(script, items)
    assert [brief(o) for o in report.outcomes] == expected
    assert [o.id for o in report.outcomes] == [i.id for i in items]
    assert len(report.calls) == len(script.sent) == 1
    call = report.calls[0]
    for outcome in report.outcomes:  # every outcome carries the deciding call's code and message
        assert (outcome.ret_code, outcome.err_msg) == (call.ret_code, call.err_msg)
        if outcome.state == "retry":
            assert 1.0 <= outcome.delay_s <= 2.0  # attempts=1: min(2**1, 300) with jitter
        else:
            assert outcome.delay_s == 0.0
    assert report.pause is (call if isinstance(call, CredentialsError) else None)
    expected_after = call.retry_after_s if isinstance(call, RateLimitedError) else None
    assert report.retry_after_s == expected_after


def test_largest_retry_after_is_reported() -> None:
    def answer(items: Sequence[BatchItem]) -> TpnsError:
        if len(items) == 4:
            return rejected()
        return RateLimitedError("slow", retry_after_s=3.0 if items[0].id == "i0" else 9.0)

    report = run(Script([answer]), [item(k) for k in range(4)])
    assert report.retry_after_s == 9.0
    assert [o.state for o in report.outcomes] == ["retry"] * 4


# -- exhausted --------------------------------------------------------------------------------

@pytest.mark.parametrize(("attempts", "age_s", "state"), [
    (1, 10.0, "retry"),
    (7, 10.0, "retry"),
    (8, 10.0, "failed"),           # the 8th call failed: the budget is spent
    (9, 10.0, "failed"),
    (1, MAX_AGE_S - 1, "retry"),
    (1, MAX_AGE_S, "failed"),      # a day old
    (1, MAX_AGE_S * 3, "failed"),
])
@pytest.mark.parametrize("answer", [accepted(1008026, "1008099"),
                                    HttpStatusError("x", code="http_500", http_status=500),
                                    accepted(1008027)],
                         ids=["item code", "transient", "missing entry"])
def test_exhausted_by_attempts_or_age(attempts: int, age_s: float, state: str,
                                      answer: Answer) -> None:
    report = run(Script([answer]), [item(1, attempts=attempts, age_s=age_s)])
    [outcome] = report.outcomes
    assert outcome.state == state
    if state == "failed":
        assert (outcome.error, outcome.delay_s) == ("exhausted", 0.0)
        assert outcome.ret_code == report.calls[0].ret_code
    else:
        assert 0 < outcome.delay_s <= 300


def test_item_code_kept_when_exhausted() -> None:
    report = run(Script([accepted(1008026, "1008099", err_msg="partly")]),
                 [item(1, attempts=MAX_ATTEMPTS)])
    assert report.outcomes == [ItemOutcome("i1", "failed", "1008099", 1008026, "partly",
                                           "exhausted")]


def test_retry_or_exhausted_directly() -> None:
    rng = random.Random(3)
    out = retry_or_exhausted(item(1, attempts=5), "timeout", now_ms=NOW_MS, max_attempts=8,
                             max_age_s=60, rng=rng)
    assert (out.state, out.error) == ("retry", "timeout")
    assert 16 <= out.delay_s <= 32
    old = retry_or_exhausted(item(1, age_s=61), "timeout", now_ms=NOW_MS, max_attempts=8,
                             max_age_s=60, rng=rng)
    assert (old.state, old.error) == ("failed", "exhausted")


# -- halving a rejected call ------------------------------------------------------------------

def server_rejecting(*bad: str) -> Callable[[Sequence[BatchItem]], CallResult | TpnsError]:
    """A call with any of ``bad`` in it is rejected; otherwise every item succeeds."""

    def answer(items: Sequence[BatchItem]) -> CallResult | TpnsError:
        if any(i.id in bad for i in items):
            return rejected()
        return accepted(0, *["0"] * len(items))

    return answer


@pytest.mark.parametrize("bad", [0, 7, 13, 19])
def test_one_bad_item_in_twenty(bad: int) -> None:
    items = [item(k) for k in range(20)]
    script = Script([server_rejecting(f"i{bad}")])
    report = run(script, items)
    states = {o.id: brief(o) for o in report.outcomes}
    assert states.pop(f"i{bad}") == ("failed", "rejected:1008007", None)
    assert set(states.values()) == {("succeeded", None, "0")}
    assert len(states) == 19
    # the full call, then two halves per level down to the single bad item
    assert len(report.calls) == len(script.sent) <= 1 + 2 * math.ceil(math.log2(20))
    assert sum(isinstance(c, CallResult) for c in report.calls) == \
        sum(isinstance(c, RejectedError) for c in report.calls) - 1
    # every good item was sent in exactly one accepted call, the bad one alone at last
    accepted_ids = [i for group in script.sent if f"i{bad}" not in group for i in group]
    assert sorted(accepted_ids) == sorted(i.id for i in items if i.id != f"i{bad}")
    assert [f"i{bad}"] in script.sent
    for group in script.sent[1:]:
        assert len(group) <= 10


def test_two_bad_items_and_outcome_codes() -> None:
    items = [item(k) for k in range(8)]
    script = Script([server_rejecting("i1", "i6")])
    report = run(script, items)
    assert [o.state for o in report.outcomes] == \
        ["succeeded", "failed", "succeeded", "succeeded", "succeeded", "succeeded", "failed",
         "succeeded"]
    for outcome in report.outcomes:
        expected = (1008007, "invalid parameter") if outcome.state == "failed" \
            else (0, "NO_ERROR")
        assert (outcome.ret_code, outcome.err_msg) == expected


def test_halves_keep_judging_items_by_result() -> None:
    def answer(items: Sequence[BatchItem]) -> CallResult | TpnsError:
        if len(items) == 4:
            return rejected(1008001)
        return accepted(1008026, "1008006", "0")

    report = run(Script([answer]), [item(k) for k in range(4)])
    assert [brief(o) for o in report.outcomes] == [
        ("failed", "invalid_token", "1008006"), ("succeeded", None, "0")] * 2


def test_transient_half_retries_only_its_items() -> None:
    def answer(items: Sequence[BatchItem]) -> CallResult | TpnsError:
        if len(items) == 4:
            return rejected()
        if items[0].id == "i2":
            return TransportError("t", code="timeout")
        return accepted(0, "0", "0")

    report = run(Script([answer]), [item(k) for k in range(4)])
    assert [(o.state, o.error) for o in report.outcomes] == [
        ("succeeded", None), ("succeeded", None), ("retry", "timeout"), ("retry", "timeout")]


# -- pause ------------------------------------------------------------------------------------

def test_credentials_in_a_half_stops_sending_and_requeues_the_rest() -> None:
    def answer(items: Sequence[BatchItem]) -> CallResult | TpnsError:
        if len(items) == 8:
            return rejected()
        if items[0].id == "i0":   # the first half (4) is rejected again, then its halves...
            return rejected() if len(items) == 4 else accepted(0, "0", "0")
        return credentials(1008031)

    script = Script([answer])
    report = run(script, [item(k) for k in range(8)])
    # 8 rejected -> [0..3] rejected -> [0,1] ok, [2,3] credentials; [4..7] never sent
    assert script.sent == [[f"i{k}" for k in range(8)], ["i0", "i1", "i2", "i3"], ["i0", "i1"],
                           ["i2", "i3"]]
    assert [(o.state, o.error) for o in report.outcomes] == \
        [("succeeded", None)] * 2 + [("requeue", "credentials:1008031")] * 6
    assert report.pause is report.calls[-1]
    assert all(o.ret_code == 1008031 for o in report.outcomes[2:])


def test_value_error_from_the_client_propagates() -> None:
    def call(operator_type: int, items: Sequence[BatchItem]) -> CallResult:
        raise ValueError("token repeated")

    with pytest.raises(ValueError):
        run(call, [item(1)])


# -- retry_delay_s ----------------------------------------------------------------------------

@given(st.integers(min_value=-3, max_value=10_000), st.integers(min_value=0, max_value=2**32))
def test_retry_delay_bounds(attempts: int, seed: int) -> None:
    delay = retry_delay_s(attempts, random.Random(seed))
    base = min(2 ** min(max(attempts, 0), 9), 300)
    assert 0 < delay <= 300
    assert base / 2 <= delay <= base


@given(st.integers(min_value=0, max_value=20), st.integers(min_value=0, max_value=2**32))
def test_retry_delay_grows_on_average(attempts: int, seed: int) -> None:
    rng = random.Random(seed)
    now = statistics.fmean(retry_delay_s(attempts, rng) for _ in range(200))
    later = statistics.fmean(retry_delay_s(attempts + 1, rng) for _ in range(200))
    if 2 ** attempts < 300:
        assert later > now
    else:  # both at the cap: the same distribution
        assert later == pytest.approx(now, rel=0.1)


def test_retry_delay_is_jittered() -> None:
    rng = random.Random(5)
    assert len({retry_delay_s(6, rng) for _ in range(50)}) == 50


# -- over the sandbox, through the real client ------------------------------------------------

def test_halving_against_the_sandbox() -> None:
    with SandboxServer(access_id="1500000009", secret_key="sandbox-outcomes-secret") as sandbox:
        app = AppConfig(name="default", access_id="1500000009",
                        secret_key="sandbox-outcomes-secret", base_url=sandbox.url)
        with TpnsClient(app, sleep=lambda s: None) as client:
            items = [item(k, token=f"reject-{k}" if k == 11 else f"tok-{k}") for k in range(20)]
            items[4] = item(4, token="invalid-4")
            report = run(client.batchoperate, items)
        stats = sandbox.stats()
        bound = {k: sandbox.bindings_of(f"tok-{k}") for k in range(20)}
    states = [(o.state, o.error) for o in report.outcomes]
    assert states[11] == ("failed", "rejected:1008007")
    assert states[4] == ("failed", "invalid_token")
    assert states.count(("succeeded", None)) == 18
    assert all(bound[k] == {0: f"u{k}"} for k in range(20) if k not in (4, 11))
    assert stats["calls"] == len(report.calls) <= 11
    assert stats["max_items_per_call"] == 20


# -- every code of the tables in worker.tpns_codes, through the real client's classification ----

class Answering(BaseAdapter):
    """A requests transport that answers every call with one HTTP status and JSON body."""

    def __init__(self, status: int, body: dict[str, object]) -> None:
        super().__init__()
        self.status, self.body = status, body

    def send(self, request: requests.PreparedRequest, *args: object,
             **kwargs: object) -> requests.Response:
        response = requests.Response()
        response.status_code = self.status
        response._content = json.dumps(self.body).encode()
        response.request = request
        return response

    def close(self) -> None:
        pass


def answered(status: int, ret_code: int, result: Sequence[str] = (),
             n: int = 3) -> BatchReport:
    """``run_batch`` over ``n`` items with a real ``TpnsClient`` whose every call is answered
    ``status`` and ``ret_code`` (``result`` for the items)."""
    session = requests.Session()
    session.mount("https://", Answering(status, {"ret_code": ret_code, "err_msg": "m",
                                                 "result": list(result)}))
    app = AppConfig(name="default", access_id="1500000001", secret_key="codes-secret",
                    base_url="https://tpns.test")
    with TpnsClient(app, session=session, sleep=lambda s: None, max_attempts=1) as client:
        report = run(client.batchoperate, [item(k) for k in range(n)])
    session.close()
    return report


@pytest.mark.parametrize("code", sorted(tpns_codes.SUCCESS_ITEM_CODES))
def test_every_success_item_code_succeeds(code: str) -> None:
    report = answered(200, tpns_codes.OK, [code] * 3)
    assert [brief(o) for o in report.outcomes] == [("succeeded", None, code)] * 3


@pytest.mark.parametrize(("code", "error"), sorted(tpns_codes.FAILED_ITEM_CODES.items()))
def test_every_failed_item_code_fails_the_item(code: str, error: str) -> None:
    report = answered(200, tpns_codes.PARTLY_FAILED, ["0", code, "0"])
    assert [brief(o) for o in report.outcomes] == [
        ("succeeded", None, "0"), ("failed", error, code), ("succeeded", None, "0")]


@pytest.mark.parametrize("ret_code", sorted(tpns_codes.ITEM_LEVEL_RET_CODES))
def test_every_item_level_ret_code_judges_items_one_by_one(ret_code: int) -> None:
    report = answered(200, ret_code, ["0", "1008099", "1008006"])
    assert [brief(o) for o in report.outcomes] == [
        ("succeeded", None, "0"), ("retry", "item_1008099", "1008099"),
        ("failed", "invalid_token", "1008006")]
    assert call_class(report.calls[0])[0] == tpns_codes.ACCEPTED_CLASSES[ret_code]


@pytest.mark.parametrize("status", [200, 400])
@pytest.mark.parametrize("ret_code", sorted(tpns_codes.REJECTED_RET_CODES))
def test_every_rejected_ret_code_halves_down_to_single_items(ret_code: int, status: int) -> None:
    report = answered(status, ret_code)
    # 3 items: the call, its halves [2] and [1], then [2]'s halves
    assert len(report.calls) == 5
    assert [brief(o) for o in report.outcomes] == [("failed", f"rejected:{ret_code}", None)] * 3
    assert {call_class(c)[0] for c in report.calls} == {"rejected"}


@pytest.mark.parametrize("ret_code", sorted(tpns_codes.CREDENTIALS_RET_CODES))
def test_every_credentials_ret_code_pauses_and_fails_nothing(ret_code: int) -> None:
    report = answered(200, ret_code)
    assert report.pause is not None and report.pause.ret_code == ret_code
    assert [brief(o) for o in report.outcomes] == [("requeue", f"credentials:{ret_code}", None)] * 3
    assert call_class(report.calls[0])[0] == "credentials"


@pytest.mark.parametrize(("status", "ret_code", "error", "cls"), [
    (tpns_codes.RATE_LIMITED_HTTP_STATUS, tpns_codes.OK, "rate_limited", "rate_limited"),
    (200, tpns_codes.RATE_LIMITED_RET_CODE, "rate_limited", "rate_limited"),
    (200, tpns_codes.SERVICE_ERROR_RET_CODE, "service_error", "transient"),
    (503, tpns_codes.OK, "http_503", "transient"),
    (500, tpns_codes.INVALID_PARAMETER, "http_500", "transient"),  # a 5xx is the server's fault
    (200, 1008099, "ret_1008099", "transient"),
])
def test_call_level_retry_rows(status: int, ret_code: int, error: str, cls: str) -> None:
    report = answered(status, ret_code)
    assert [brief(o) for o in report.outcomes] == [("retry", error, None)] * 3
    assert report.pause is None
    assert call_class(report.calls[0]) == (cls, -1.0)
    assert cls in tpns_codes.CALL_CLASSES
