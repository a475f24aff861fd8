"""TpnsClient and build_body: request shape, auth, the call-level rows of SPEC §6, in-call retries.

Fakes only at seams we own: a ``requests`` transport adapter mounted on the client's session, an
injected ``sleep`` that records the schedule (and moves a fake clock) instead of waiting. The
socket-level cases (timeouts, dropped connections, non-JSON bodies) run over real sockets.
"""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from worker.auth import basic_header, verify_basic, verify_sign
from worker.client import USER_AGENT, CallResult, TpnsClient, build_body, encode_body
from worker.errors import (
    BadResponseError,
    ConfigError,
    CredentialsError,
    HttpStatusError,
    RateLimitedError,
    RejectedError,
    ServiceError,
    TpnsError,
    TransientError,
    TransportError,
    UnexpectedRetCodeError,
)
from worker.model import Account, BatchItem
from worker.sandbox.server import SandboxServer
from worker.settings import AppConfig

ACCESS_ID = "1500001048"
SECRET = "s3cr3t-1452fcebae9f3115ba794fb0fff2fd73"
BASIC_TOKEN = basic_header(ACCESS_ID, SECRET)["Authorization"].removeprefix("Basic ")
BASE = "https://tpns.test"
T0 = 1_700_000_000.0


# -- the fakes ---------------------------------------------------------------------------------

@dataclass
class Reply:
    """One scripted HTTP answer."""

    body: Any = field(default_factory=lambda: {"ret_code": 0, "err_msg": "NO_ERROR", "result": []})
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def content(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


class FakeTransport(BaseAdapter):
    """A requests adapter that records each request and plays a script (the last step repeats)."""

    def __init__(self, *script: Reply | BaseException | Callable[[requests.PreparedRequest], Reply],
                 clock: FakeClock | None = None, latency_s: float = 0.0) -> None:
        super().__init__()
        self.script = list(script) or [Reply()]
        self.sent: list[requests.PreparedRequest] = []
        self.kwargs: list[dict[str, Any]] = []
        self.closed = False
        self.clock = clock
        self.latency_s = latency_s

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Any = None) -> requests.Response:
        self.sent.append(request)
        self.kwargs.append({"timeout": timeout, "verify": verify, "stream": stream})
        if self.clock is not None:
            self.clock.now += self.latency_s
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, BaseException):
            raise step
        reply = step(request) if callable(step) else step
        response = requests.Response()
        response.status_code = reply.status
        response._content = reply.content()
        response.headers = CaseInsensitiveDict(reply.headers)
        response.url = request.url or ""
        response.request = request
        response.encoding = "utf-8"
        return response

    def close(self) -> None:
        self.closed = True

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.sent]  # type: ignore[arg-type]


class FakeClock:
    """``time.time`` and ``time.sleep`` in one: sleeping records the delay and moves the clock."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def app(auth: str = "sign", base_url: str = BASE) -> AppConfig:
    return AppConfig(name="default", access_id=ACCESS_ID, secret_key=SECRET, base_url=base_url,
                     auth=auth)


def item(n: int, *accounts: Account, token: str | None = "") -> BatchItem:
    tok = f"token-{n}" if token == "" else token
    return BatchItem(id=f"id-{n}", token=tok, accounts=accounts or (Account(f"user-{n}"),))


@dataclass
class Rig:
    client: TpnsClient
    transport: FakeTransport
    clock: FakeClock
    session: requests.Session


@pytest.fixture
def make() -> Iterator[Callable[..., Rig]]:
    """Build a client over a fake transport; every session is closed after the test."""
    sessions: list[requests.Session] = []

    def build(*script: Any, auth: str = "sign", latency_s: float = 0.0, **kw: Any) -> Rig:
        clock = FakeClock()
        transport = FakeTransport(*script, clock=clock, latency_s=latency_s)
        session = requests.Session()
        session.mount(BASE + "/", transport)
        sessions.append(session)
        client = TpnsClient(app(auth), session=session, sleep=clock.sleep, clock=clock, **kw)
        return Rig(client, transport, clock, session)

    yield build
    for session in sessions:
        session.close()


def verification_on(verify: Any) -> bool:
    """True, or a CA bundle path (requests substitutes $REQUESTS_CA_BUNDLE for True)."""
    return verify is True or (isinstance(verify, str) and bool(verify))


def ok(*codes: str, ret_code: int = 0) -> Reply:
    return Reply({"ret_code": ret_code, "err_msg": "NO_ERROR", "result": list(codes)})


def code(ret_code: int, err_msg: str = "some error", **kw: Any) -> Reply:
    return Reply({"ret_code": ret_code, "err_msg": err_msg}, **kw)


# -- build_body --------------------------------------------------------------------------------

@pytest.mark.parametrize("op", [1, 2, 3])
def test_body_of_token_account_ops(op: int) -> None:
    items = [item(1, Account("a@x.com", 1005), Account("+8613711112222", 1002)), item(2)]
    assert build_body(op, items) == {"operator_type": op, "token_accounts": [
        {"token": "token-1", "account_list": [{"account": "a@x.com", "account_type": 1005},
                                              {"account": "+8613711112222", "account_type": 1002}]},
        {"token": "token-2", "account_list": [{"account": "user-2", "account_type": 0}]}]}


def test_body_of_op4_is_a_token_list() -> None:
    items = [BatchItem(id=f"i{n}", token=f"t{n}", accounts=()) for n in range(3)]
    assert build_body(4, items) == {"operator_type": 4, "token_list": ["t0", "t1", "t2"]}


def test_body_of_op5_is_an_account_list() -> None:
    items = [item(1, Account("a", 3), token=None), item(2, Account("a", 4), token=None)]
    assert build_body(5, items) == {"operator_type": 5, "account_list": [
        {"account": "a", "account_type": 3}, {"account": "a", "account_type": 4}]}


@pytest.mark.parametrize(("op", "items", "message"), [
    (2, [item(n) for n in range(21)], "at most 20"),
    (2, [], "at least one"),
    (2, [item(1), item(2, token="token-1")], "token repeated"),
    (4, [item(1), item(2, token="token-1")], "token repeated"),
    (5, [item(1, Account("a", 1), token=None), item(2, Account("a", 1), token=None)],
     "account"),
    (5, [item(1)], "op 5 takes one account and no token"),
    (5, [item(1, Account("a"), Account("b"), token=None)], "op 5 takes one account"),
    (2, [item(1, token=None)], "needs a token"),
    (3, [BatchItem(id="x", token="t", accounts=())], "at least one account"),
    (6, [item(1)], "operator_type"),
    (True, [item(1)], "operator_type"),
])
def test_body_refuses_programming_errors(op: int, items: list[BatchItem], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_body(op, items)


def test_twenty_items_is_fine() -> None:
    assert len(build_body(2, [item(n) for n in range(20)])["token_accounts"]) == 20


def test_encoded_body_is_compact_utf8() -> None:
    raw = encode_body(build_body(2, [item(1, Account("张三", 5))]))
    assert raw == ('{"operator_type":2,"token_accounts":[{"token":"token-1","account_list":'
                   '[{"account":"张三","account_type":5}]}]}').encode()


# -- request shape and auth --------------------------------------------------------------------

def test_request_shape(make: Callable[..., Rig]) -> None:
    rig = make(ok("0", "0"))
    items = [item(1, Account("张三", 5)), item(2)]
    result = rig.client.batchoperate(2, items)
    assert result == CallResult(0, "NO_ERROR", ("0", "0"), 200, 1, result.latency_ms)
    [sent] = rig.transport.sent
    assert sent.method == "POST"
    assert sent.url == BASE + "/v3/device/account/batchoperate"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["User-Agent"] == USER_AGENT
    assert USER_AGENT.startswith("tpns-batcher/")
    assert sent.body == encode_body(build_body(2, items))
    [kwargs] = rig.transport.kwargs
    assert (kwargs["timeout"], kwargs["stream"]) == ((10.0, 10.0), False)
    assert verification_on(kwargs["verify"])


def test_session_verify_false_is_overridden(make: Callable[..., Rig]) -> None:
    rig = make(ok("0"), timeout_s=2.5)
    rig.session.verify = False
    rig.client.batchoperate(4, [BatchItem(id="a", token="t", accounts=())])
    assert verification_on(rig.transport.kwargs[0]["verify"])
    assert rig.transport.kwargs[0]["timeout"] == (2.5, 2.5)


def test_sign_auth_headers_verify(make: Callable[..., Rig]) -> None:
    rig = make(ok("0"))
    rig.clock.now = 1565314789.75
    rig.client.batchoperate(3, [item(1, Account("ü-user", 1))])
    [sent] = rig.transport.sent
    assert sent.headers["AccessId"] == ACCESS_ID
    assert sent.headers["TimeStamp"] == "1565314789"
    assert isinstance(sent.body, bytes)
    assert verify_sign(SECRET, ACCESS_ID, "1565314789", sent.body, sent.headers["Sign"])
    assert not verify_sign(SECRET, ACCESS_ID, "1565314789", sent.body + b" ", sent.headers["Sign"])
    assert "Authorization" not in sent.headers


def test_sign_is_recomputed_per_attempt(make: Callable[..., Rig]) -> None:
    rig = make(Reply(status=503), ok("0"), max_attempts=2)
    rig.client.batchoperate(4, [BatchItem(id="a", token="t", accounts=())])
    first, second = rig.transport.sent
    assert first.body == second.body
    for sent in (first, second):
        assert verify_sign(SECRET, ACCESS_ID, sent.headers["TimeStamp"], sent.body,  # type: ignore[arg-type]
                           sent.headers["Sign"])
    assert int(second.headers["TimeStamp"]) >= int(first.headers["TimeStamp"])


def test_basic_auth_header(make: Callable[..., Rig]) -> None:
    rig = make(ok("0"), auth="basic")
    rig.client.batchoperate(5, [item(1, Account("a"), token=None)])
    [sent] = rig.transport.sent
    assert verify_basic(ACCESS_ID, SECRET, sent.headers["Authorization"])
    assert "Sign" not in sent.headers


def test_client_needs_credentials() -> None:
    with pytest.raises(ConfigError, match="TPNS_ACCESS_ID"):
        TpnsClient(AppConfig(name="default", access_id=None, base_url=BASE))


# -- SPEC §6, the rows the client decides -------------------------------------------------------

ITEMS = [item(1), item(2)]


@pytest.mark.parametrize(("reply", "ret_code", "result"), [
    (ok("0", "0"), 0, ("0", "0")),
    (ok("ok", "ok"), 0, ("ok", "ok")),
    (ok("0"), 0, ("0",)),
    (ok("0", "1008006", ret_code=1008026), 1008026, ("0", "1008006")),
    (ok("1008006", "1008006", ret_code=1008027), 1008027, ("1008006", "1008006")),
    (Reply({"retCode": 0, "errMsg": "ok", "result": ["0", 0]}), 0, ("0", "0")),
    (Reply({"ret_code": 0, "err_msg": "NO_ERROR"}), 0, ()),
    (Reply({"ret_code": 0, "result": None}), 0, ()),
    (Reply({"ret_code": 0, "result": []}, status=201), 0, ()),
])
def test_accepted_calls_return(make: Callable[..., Rig], reply: Reply, ret_code: int,
                               result: tuple[str, ...]) -> None:
    rig = make(reply)
    got = rig.client.batchoperate(2, ITEMS)
    assert (got.ret_code, got.result, got.attempts) == (ret_code, result, 1)
    assert len(rig.transport.sent) == 1


@pytest.mark.parametrize(("reply", "cls", "code_", "ret_code", "status", "requests_made"), [
    (code(1008001), RejectedError, "rejected:1008001", 1008001, 200, 1),
    (code(1008002), RejectedError, "rejected:1008002", 1008002, 200, 1),
    (code(1008007), RejectedError, "rejected:1008007", 1008007, 200, 1),
    (code(1008003), CredentialsError, "credentials:1008003", 1008003, 200, 1),
    (code(10030002), CredentialsError, "credentials:10030002", 10030002, 200, 1),
    (code(1008030), CredentialsError, "credentials:1008030", 1008030, 200, 1),
    (code(1008031), CredentialsError, "credentials:1008031", 1008031, 200, 1),
    (code(1010001), CredentialsError, "credentials:1010001", 1010001, 200, 1),
    (code(1008003, status=401), CredentialsError, "credentials:1008003", 1008003, 401, 1),
    (code(1008007, status=400), RejectedError, "rejected:1008007", 1008007, 400, 1),
    (code(1008028), RateLimitedError, "rate_limited", 1008028, 200, 3),
    (Reply(b"slow down", status=429), RateLimitedError, "rate_limited", None, 429, 3),
    (code(1008004), ServiceError, "service_error", 1008004, 200, 3),
    (Reply(b"<html>oops</html>", status=500), HttpStatusError, "http_500", None, 500, 3),
    (Reply(b"", status=503), HttpStatusError, "http_503", None, 503, 3),
    (code(1008003, status=503), HttpStatusError, "http_503", 1008003, 503, 3),
    (Reply(b"", status=404), HttpStatusError, "http_404", None, 404, 3),
    (Reply(b"", status=302, headers={"Location": "https://x"}), HttpStatusError, "http_302",
     None, 302, 3),
    (Reply(b"<html>proxy</html>"), BadResponseError, "bad_response", None, 200, 3),
    (Reply(b"\xff\xfe"), BadResponseError, "bad_response", None, 200, 3),
    (Reply([0, "ok"]), BadResponseError, "bad_response", None, 200, 3),
    (Reply({"ret_code": "0"}), BadResponseError, "bad_response", None, 200, 3),
    (Reply({"ret_code": True}), BadResponseError, "bad_response", None, 200, 3),
    (Reply({"err_msg": "no code"}), BadResponseError, "bad_response", None, 200, 3),
    (Reply({"ret_code": 0, "result": "0"}), BadResponseError, "bad_response", 0, 200, 3),
    (code(1008099, "what"), UnexpectedRetCodeError, "ret_1008099", 1008099, 200, 3),
    (code(1008006), UnexpectedRetCodeError, "ret_1008006", 1008006, 200, 3),
])
def test_failed_calls_raise(make: Callable[..., Rig], reply: Reply, cls: type[TpnsError],
                            code_: str, ret_code: int | None, status: int,
                            requests_made: int) -> None:
    rig = make(reply)
    with pytest.raises(cls) as info:
        rig.client.batchoperate(2, ITEMS)
    exc = info.value
    assert type(exc) is cls
    assert (exc.code, exc.ret_code, exc.http_status) == (code_, ret_code, status)
    assert exc.err_msg == (reply.body.get("err_msg", "") if isinstance(reply.body, dict)
                           and ret_code is not None else None)
    assert len(rig.transport.sent) == requests_made
    assert isinstance(exc, TransientError) == (requests_made > 1)
    assert len(rig.clock.sleeps) == requests_made - 1


@pytest.mark.parametrize(("error", "code_"), [
    (requests.ConnectTimeout("connect timed out"), "timeout"),
    (requests.ReadTimeout("read timed out"), "timeout"),
    (requests.ConnectionError("refused"), "connection_error"),
    (requests.exceptions.ChunkedEncodingError("cut"), "connection_error"),
    (requests.exceptions.SSLError("bad cert"), "connection_error"),
])
def test_transport_errors(make: Callable[..., Rig], error: Exception, code_: str) -> None:
    rig = make(error)
    with pytest.raises(TransportError) as info:
        rig.client.batchoperate(2, ITEMS)
    assert info.value.code == code_
    assert (info.value.ret_code, info.value.http_status) == (None, None)
    assert len(rig.transport.sent) == 3


# -- in-call retries ---------------------------------------------------------------------------

def test_transient_then_success(make: Callable[..., Rig]) -> None:
    rig = make(Reply(status=503), code(1008004), ok("0", "0"))
    got = rig.client.batchoperate(2, ITEMS)
    assert (got.ret_code, got.attempts) == (0, 3)
    assert len(rig.clock.sleeps) == 2
    assert 0.2 <= rig.clock.sleeps[0] <= 0.4
    assert 0.4 <= rig.clock.sleeps[1] <= 0.6


def test_backoff_schedule_is_exponential_jittered_and_bounded(make: Callable[..., Rig]) -> None:
    for _ in range(20):  # the jitter is random: hold the bounds over many runs
        rig = make(Reply(status=500), max_attempts=7)
        with pytest.raises(HttpStatusError):
            rig.client.batchoperate(2, ITEMS)
        low = [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
        assert len(rig.clock.sleeps) == 6
        for got, floor in zip(rig.clock.sleeps, low, strict=True):
            assert floor <= got <= min(floor + 0.2, 2.0)


def test_custom_wait_bounds(make: Callable[..., Rig]) -> None:
    rig = make(Reply(status=500), max_attempts=5, wait_min_s=1.0, wait_max_s=3.0)
    with pytest.raises(HttpStatusError):
        rig.client.batchoperate(2, ITEMS)
    assert all(1.0 <= s <= 3.0 for s in rig.clock.sleeps)
    assert rig.clock.sleeps[-1] == 3.0


def test_max_attempts_one_means_no_retry(make: Callable[..., Rig]) -> None:
    rig = make(Reply(status=503), max_attempts=1)
    with pytest.raises(HttpStatusError):
        rig.client.batchoperate(2, ITEMS)
    assert (len(rig.transport.sent), rig.clock.sleeps) == (1, [])


@pytest.mark.parametrize(("header", "expected"), [
    ("5", 5.0),
    ("0.5", 0.5),
    ("120", 30.0),                                                 # capped
    (email.utils.formatdate(T0 + 7, usegmt=True), 7.0),           # an HTTP date
    (email.utils.formatdate(T0 - 60, usegmt=True), 0.0),          # in the past
])
def test_retry_after_is_honoured_and_capped(make: Callable[..., Rig], header: str,
                                            expected: float) -> None:
    rig = make(code(1008028, headers={"Retry-After": header}), ok("0", "0"))
    got = rig.client.batchoperate(2, ITEMS)
    assert got.attempts == 2
    assert rig.clock.sleeps == [pytest.approx(expected)]


def test_retry_after_on_429_and_attribute(make: Callable[..., Rig]) -> None:
    rig = make(Reply(b"", status=429, headers={"Retry-After": "3"}), max_attempts=2,
               retry_after_cap_s=2.0)
    with pytest.raises(RateLimitedError) as info:
        rig.client.batchoperate(2, ITEMS)
    assert info.value.retry_after_s == 3.0          # what the server said...
    assert rig.clock.sleeps == [2.0]                # ...capped for the in-call wait


def test_bad_retry_after_falls_back_to_backoff(make: Callable[..., Rig]) -> None:
    rig = make(Reply(b"", status=429, headers={"Retry-After": "soon"}), max_attempts=2)
    with pytest.raises(RateLimitedError) as info:
        rig.client.batchoperate(2, ITEMS)
    assert info.value.retry_after_s is None
    assert 0.2 <= rig.clock.sleeps[0] <= 0.4


def test_budget_stops_before_a_sleep_would_cross_it(make: Callable[..., Rig]) -> None:
    # each request takes 0.5 s, Retry-After says 2 s: 0.5 + 2 + 0.5 + 2 = 5 s before attempt 3,
    # whose failure ends at 5.5 s; a third 2 s sleep would end at 7.5 s > 6 s, so it stops there
    rig = make(code(1008028, headers={"Retry-After": "2"}), max_attempts=10, budget_s=6.0,
               latency_s=0.5)
    with pytest.raises(RateLimitedError):
        rig.client.batchoperate(2, ITEMS)
    assert rig.clock.sleeps == [2.0, 2.0]
    assert len(rig.transport.sent) == 3
    assert rig.clock.now - T0 == pytest.approx(5.5)


def test_budget_smaller_than_retry_after_means_one_attempt(make: Callable[..., Rig]) -> None:
    rig = make(code(1008028, headers={"Retry-After": "20"}), budget_s=10.0)
    with pytest.raises(RateLimitedError):
        rig.client.batchoperate(2, ITEMS)
    assert (len(rig.transport.sent), rig.clock.sleeps) == (1, [])


def test_before_call_runs_before_every_attempt(make: Callable[..., Rig]) -> None:
    events: list[str] = []

    def reply(request: requests.PreparedRequest) -> Reply:
        events.append("http")
        return Reply(status=503) if events.count("http") < 3 else ok("0", "0")

    rig = make(reply, before_call=lambda: events.append("limiter"))
    rig.client.batchoperate(2, ITEMS)
    assert events == ["limiter", "http"] * 3


def test_each_call_gets_fresh_attempts(make: Callable[..., Rig]) -> None:
    rig = make(Reply(status=503), Reply(status=503), Reply(status=503), Reply(status=503),
               ok("0", "0"))
    with pytest.raises(HttpStatusError):
        rig.client.batchoperate(2, ITEMS)
    got = rig.client.batchoperate(2, ITEMS)  # a shared Retrying would carry attempt 3 over
    assert got.attempts == 2


def test_concurrent_calls_do_not_share_retry_state(make: Callable[..., Rig]) -> None:
    def reply(request: requests.PreparedRequest) -> Reply:
        body = json.loads(request.body)  # type: ignore[arg-type]
        return ok("0") if body["token_list"][0].endswith("-ok") else Reply(status=503)

    rig = make(reply)
    results: list[object] = []

    def run(n: int) -> None:
        token = f"t{n}-ok" if n % 2 else f"t{n}"
        try:
            results.append(rig.client.batchoperate(4, [BatchItem(id=str(n), token=token,
                                                                  accounts=())]))
        except HttpStatusError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(type(r).__name__ for r in results) == ["CallResult"] * 4 + ["HttpStatusError"] * 4
    assert len(rig.transport.sent) == 4 * 1 + 4 * 3


# -- logging and secrets -----------------------------------------------------------------------

def test_logs_one_info_line_per_request_and_a_warning_per_retry(
        make: Callable[..., Rig], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.client")
    rig = make(Reply(status=503), ok("0", "0"))
    rig.client.batchoperate(3, ITEMS)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(infos) == 2 and len(warnings) == 1
    assert "op=3 items=2" in infos[1].getMessage()
    assert "ret_code=0" in infos[1].getMessage() and "attempt=2" in infos[1].getMessage()
    assert "http_503" in infos[0].getMessage()
    assert "op=3 items=2 attempt 1 failed (http_503)" in warnings[0].getMessage()
    assert isinstance(infos[1].args, tuple) and infos[1].msg.count("%") >= 5  # lazy formatting


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def assert_no_secret(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    for link in _chain(exc):
        for text in (str(link), repr(link), repr(vars(link))):
            assert SECRET not in text and BASIC_TOKEN not in text
        assert not isinstance(link, requests.RequestException)  # it holds the request headers
    assert caplog.records, "the call should have logged"
    for record in caplog.records:
        for text in (record.getMessage(), repr(record.args), repr(record.__dict__)):
            assert SECRET not in text and BASIC_TOKEN not in text


@pytest.mark.parametrize("auth", ["sign", "basic"])
@pytest.mark.parametrize("script", [
    requests.ConnectTimeout("timed out"),
    requests.ConnectionError("reset"),
    Reply(status=503),
    Reply(b"<html/>"),
    code(1008003, f"bad key {SECRET} for {BASIC_TOKEN}"),   # a server echoing credentials
    code(1008007),
    code(1008028, f"slow {SECRET}"),
])
def test_secret_never_leaks(make: Callable[..., Rig], caplog: pytest.LogCaptureFixture,
                            auth: str, script: Any) -> None:
    caplog.set_level(logging.DEBUG)

    def attach(request: requests.PreparedRequest) -> Reply:
        # requests exceptions carry the prepared request (with the auth headers) when raised
        if isinstance(script, requests.RequestException):
            script.request = request
            raise script
        assert isinstance(script, Reply)
        return script

    rig = make(attach, auth=auth)
    with pytest.raises(TpnsError) as info:
        rig.client.batchoperate(2, ITEMS)
    assert_no_secret(info.value, caplog)
    assert SECRET not in repr(rig.client)


def test_echoed_credentials_are_redacted(make: Callable[..., Rig]) -> None:
    rig = make(code(1008003, f"bad key {SECRET} / {BASIC_TOKEN}"), auth="basic")
    with pytest.raises(CredentialsError) as info:
        rig.client.batchoperate(2, ITEMS)
    assert info.value.err_msg == "bad key *** / ***"


# -- close -------------------------------------------------------------------------------------

def test_close_leaves_a_given_session_open(make: Callable[..., Rig]) -> None:
    rig = make(ok("0"))
    rig.client.close()
    assert not rig.transport.closed


def test_close_closes_its_own_session() -> None:
    transport = FakeTransport(ok("0"))
    with TpnsClient(app()) as client:
        client._session.mount(BASE + "/", transport)
        client.batchoperate(4, [BatchItem(id="a", token="t", accounts=())])
    assert transport.closed


# -- real sockets ------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    """Answers per the path's last segment of the server's ``mode``."""

    server: _Server

    def do_POST(self) -> None:
        self.server.hits += 1
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.bodies.append(body)
        mode = self.server.mode
        if mode == "hang":
            self.server.release.wait(10)
            return
        if mode == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "cut":  # promises 100 bytes, sends 5, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"ret')
            self.close_connection = True
            return
        payload = b"<html>gateway</html>" if mode == "html" else json.dumps(
            {"ret_code": 0, "err_msg": "NO_ERROR", "result": ["0"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if mode == "html" else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.hits = 0
        self.bodies: list[bytes] = []
        self.release = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hung up on a hanging handler: expected here


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def socket_client(server: _Server) -> Iterator[Callable[[float], tuple[TpnsClient, FakeClock]]]:
    """``socket_client(timeout_s)``: a client of ``server``. A short timeout only where the
    server hangs on purpose: elsewhere a slow answer on a loaded machine must not pass for one."""
    clients: list[TpnsClient] = []

    def build(timeout_s: float) -> tuple[TpnsClient, FakeClock]:
        clock = FakeClock()
        port = server.server_address[1]
        client = TpnsClient(app(base_url=f"http://127.0.0.1:{port}"), timeout_s=timeout_s,
                            max_attempts=2, sleep=clock.sleep, clock=clock)
        clients.append(client)
        return client, clock

    yield build
    for client in clients:
        client.close()


SocketClient = Callable[[float], tuple[TpnsClient, FakeClock]]


def test_socket_ok_reuses_one_connection(server: _Server, socket_client: SocketClient) -> None:
    client, _ = socket_client(10)
    for _ in range(3):
        assert client.batchoperate(4, [BatchItem(id="a", token="t", accounts=())]).result == ("0",)
    assert server.bodies == [b'{"operator_type":4,"token_list":["t"]}'] * 3


@pytest.mark.parametrize(("mode", "cls", "code_"), [
    ("hang", TransportError, "timeout"),
    ("drop", TransportError, "connection_error"),
    ("cut", TransportError, "connection_error"),
    ("html", BadResponseError, "bad_response"),
])
def test_socket_failures(server: _Server, socket_client: SocketClient,
                         caplog: pytest.LogCaptureFixture, mode: str, cls: type[TpnsError],
                         code_: str) -> None:
    caplog.set_level(logging.DEBUG)
    client, clock = socket_client(0.2 if mode == "hang" else 10)
    server.mode = mode
    with pytest.raises(cls) as info:
        client.batchoperate(2, ITEMS)
    assert info.value.code == code_
    assert server.hits == 2 and len(clock.sleeps) == 1
    assert_no_secret(info.value, caplog)


def test_socket_connection_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = FakeClock()
    with TpnsClient(app(auth="basic", base_url=f"http://127.0.0.1:{port}"), timeout_s=0.5,
                    sleep=clock.sleep, clock=clock) as client:
        with pytest.raises(TransportError) as info:
            client.batchoperate(2, ITEMS)
    assert info.value.code == "connection_error"
    assert len(clock.sleeps) == 2
    assert_no_secret(info.value, caplog)


# -- against the sandbox (real sockets, real validation and state) ------------------------------

SANDBOX_SECRET = "sandbox-test-secret-7f3a"


@pytest.fixture
def on_sandbox(sandbox: SandboxServer) -> Iterator[Callable[..., tuple[TpnsClient, FakeClock]]]:
    """Clients of the sandbox, which takes this module's credentials; the clock starts at the real
    time (the sandbox checks the skew)."""
    sandbox.configure(access_id=ACCESS_ID, secret_key=SANDBOX_SECRET)
    clients: list[TpnsClient] = []

    def build(auth: str = "sign", secret: str = SANDBOX_SECRET,
              **kw: Any) -> tuple[TpnsClient, FakeClock]:
        clock = FakeClock(time.time())
        config = AppConfig(name="default", access_id=ACCESS_ID, secret_key=secret,
                           base_url=sandbox.url, auth=auth)
        client = TpnsClient(config, sleep=clock.sleep, clock=clock, **kw)
        clients.append(client)
        return client, clock

    yield build
    for client in clients:
        client.close()


@pytest.mark.parametrize("auth", ["sign", "basic"])
def test_sandbox_applies_every_op(sandbox: SandboxServer,
                                  on_sandbox: Callable[..., tuple[TpnsClient, FakeClock]],
                                  auth: str) -> None:
    client, _ = on_sandbox(auth)
    t1 = BatchItem(id="1", token="tok-1", accounts=(Account("a@x.com", 1005),
                                                    Account("+8613711112222", 1002)))
    t2 = BatchItem(id="2", token="tok-2", accounts=(Account("张三"),))
    got = client.batchoperate(2, [t1, t2])
    assert (got.ret_code, got.result, got.http_status) == (0, ("0", "0"), 200)
    assert sandbox.bindings_of("tok-1") == {1005: "a@x.com", 1002: "+8613711112222"}
    assert sandbox.bindings_of("tok-2") == {0: "张三"}

    client.batchoperate(3, [BatchItem(id="3", token="tok-1", accounts=(Account("a@x.com", 1005),))])
    assert sandbox.bindings_of("tok-1") == {1002: "+8613711112222"}
    client.batchoperate(1, [BatchItem(id="4", token="tok-3", accounts=(Account("张三"),))])
    assert sandbox.tokens_of("张三") == {"tok-2", "tok-3"}
    client.batchoperate(5, [BatchItem(id="5", token=None, accounts=(Account("张三"),))])
    assert sandbox.tokens_of("张三") == set()
    client.batchoperate(4, [BatchItem(id="6", token="tok-1", accounts=())])
    assert sandbox.bindings_of("tok-1") == {}
    assert sandbox.stats()["calls_by_op"] == {"1": 1, "2": 1, "3": 1, "4": 1, "5": 1}


def test_sandbox_item_level_codes(on_sandbox: Callable[..., tuple[TpnsClient, FakeClock]]) -> None:
    client, _ = on_sandbox()
    partly = client.batchoperate(2, [item(1), item(2, token="invalid-2")])
    assert (partly.ret_code, partly.result) == (1008026, ("0", "1008006"))
    total = client.batchoperate(4, [BatchItem(id="x", token="invalid-x", accounts=())])
    assert (total.ret_code, total.result) == (1008027, ("1008006",))


def test_sandbox_rejects_and_refuses(on_sandbox: Callable[..., tuple[TpnsClient, FakeClock]],
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client, clock = on_sandbox()
    with pytest.raises(RejectedError) as rejected:
        client.batchoperate(2, [item(1), item(2, token="reject-2")])
    assert rejected.value.ret_code == 1008007
    wrong, _ = on_sandbox(auth="basic", secret=SECRET)
    with pytest.raises(CredentialsError) as refused:
        wrong.batchoperate(2, [item(1)])
    assert (refused.value.ret_code, refused.value.http_status) == (1008003, 200)
    assert clock.sleeps == []
    assert_no_secret(refused.value, caplog)


@pytest.mark.parametrize(("fault", "cls", "code_"), [
    ("http_500", HttpStatusError, "http_500"),
    ("http_503", HttpStatusError, "http_503"),
    ("http_429", RateLimitedError, "rate_limited"),
    ("1008028", RateLimitedError, "rate_limited"),
    ("1008004", ServiceError, "service_error"),
    ("drop", TransportError, "connection_error"),
    ("timeout", TransportError, "timeout"),
])
def test_sandbox_faults(sandbox: SandboxServer,
                        on_sandbox: Callable[..., tuple[TpnsClient, FakeClock]],
                        caplog: pytest.LogCaptureFixture, fault: str, cls: type[TpnsError],
                        code_: str) -> None:
    caplog.set_level(logging.DEBUG)
    sandbox.configure(fault_rate=1.0, faults=(fault,), retry_after_s=1.5, slow_ms=5000)
    # a short timeout only for the fault that answers late on purpose: elsewhere a slow answer
    # on a loaded machine must not pass for a timeout
    client, clock = on_sandbox(timeout_s=0.15 if fault == "timeout" else 10)
    with pytest.raises(cls) as info:
        client.batchoperate(2, [item(1)])
    assert info.value.code == code_
    assert sandbox.stats()["calls"] == 3
    assert sandbox.stats()["faults"] == {fault: 3}
    if cls is RateLimitedError:
        assert info.value.retry_after_s == 1.5  # type: ignore[attr-defined]
        assert clock.sleeps == [1.5, 1.5]
    assert_no_secret(info.value, caplog)


def test_sandbox_recovers_within_the_call(sandbox: SandboxServer,
                                          on_sandbox: Callable[..., tuple[TpnsClient, FakeClock]]
                                          ) -> None:
    sandbox.configure(fault_rate=1.0, faults=("http_503",))
    calls = 0

    def heal() -> None:  # the before_call hook: the outage ends before the third attempt
        nonlocal calls
        calls += 1
        if calls == 3:
            sandbox.configure(fault_rate=0.0)

    client, _ = on_sandbox(before_call=heal)
    got = client.batchoperate(2, [item(1)])
    assert (got.ret_code, got.attempts) == (0, 3)
    assert sandbox.bindings_of("token-1") == {0: "user-1"}
