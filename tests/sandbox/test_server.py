"""The TPNS sandbox over real sockets: state, query, auth, validation, faults, admin, CLI."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any

import pytest
import requests

from tests.support.polling import wait_until
from worker.auth import basic_header, sign_headers
from worker.sandbox.auth import SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY
from worker.sandbox.config import SandboxConfigError
from worker.sandbox.server import BATCH_PATH, QUERY_PATH, SandboxServer

PHONE = "+8613711112222"


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def post(http: requests.Session, sandbox: SandboxServer, payload: Any = None, *,
         path: str = BATCH_PATH, auth: str = "sign", access_id: str = SANDBOX_ACCESS_ID,
         secret: str = SANDBOX_SECRET_KEY, timestamp: int | None = None, raw: bytes | None = None,
         timeout: float = 5.0) -> requests.Response:
    """POST ``payload`` (or ``raw`` bytes) signed the way ``auth`` says (sign, basic or none)."""
    body = raw if raw is not None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if auth == "sign":
        ts = int(time.time()) if timestamp is None else timestamp
        headers.update(sign_headers(access_id, secret, body, ts))
    elif auth == "basic":
        headers.update(basic_header(access_id, secret))
    return http.post(sandbox.url + path, data=body, headers=headers, timeout=timeout)


def ta(token: str, *accounts: str | tuple[str, int]) -> dict[str, Any]:
    """One ``token_accounts`` entry; an account is ``"u1"`` (type 0) or ``("u1", 1005)``."""
    return {"token": token, "account_list": [
        {"account": a} if isinstance(a, str) else {"account": a[0], "account_type": a[1]}
        for a in accounts]}


def op(http: requests.Session, sandbox: SandboxServer, operator_type: int,
       **fields: Any) -> dict[str, Any]:
    response = post(http, sandbox, {"operator_type": operator_type, **fields})
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def query(http: requests.Session, sandbox: SandboxServer, payload: dict[str, Any],
          **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = post(http, sandbox, payload, path=QUERY_PATH, **kw).json()
    return body


# -- binding state and query --

def test_bind_is_visible_in_state_and_both_queries(sandbox: SandboxServer,
                                                   http: requests.Session) -> None:
    answer = op(http, sandbox, 2, token_accounts=[ta("t1", "u1", (PHONE, 1002)), ta("t2", "u1")])
    assert answer == {"ret_code": 0, "err_msg": "NO_ERROR", "result": ["0", "0"]}
    assert sandbox.bindings_of("t1") == {0: "u1", 1002: PHONE}
    assert sandbox.tokens_of("u1") == {"t1", "t2"}
    assert sandbox.tokens_of(PHONE, 1002) == {"t1"}

    by_account = query(http, sandbox, {"operator_type": 1, "account_list": [
        {"account": "u1"}, {"account": PHONE, "account_type": 1002}]})
    assert by_account == {"retCode": 0, "errMsg": "NO_ERROR", "result": ["0", "0"],
                          "account_tokens": [
                              {"account": "u1", "account_type": 0, "token_list": ["t1", "t2"]},
                              {"account": PHONE, "account_type": 1002, "token_list": ["t1"]}]}
    by_token = query(http, sandbox, {"operator_type": 2, "token_list": ["t1"]}, auth="basic")
    assert by_token["token_accounts"] == [{"token": "t1", "account_list": [
        {"account": "u1", "account_type": 0}, {"account": PHONE, "account_type": 1002}]}]


def test_op1_overrides_like_op2_and_moves_the_token_between_accounts(
        sandbox: SandboxServer, http: requests.Session) -> None:
    op(http, sandbox, 2, token_accounts=[ta("t1", "u1")])
    assert op(http, sandbox, 1, token_accounts=[ta("t1", "u2")])["ret_code"] == 0
    assert sandbox.bindings_of("t1") == {0: "u2"}
    assert sandbox.tokens_of("u1") == set()
    assert sandbox.tokens_of("u2") == {"t1"}


def test_override_replaces_only_the_account_types_named(sandbox: SandboxServer,
                                                        http: requests.Session) -> None:
    op(http, sandbox, 2, token_accounts=[ta("t1", "u1", ("a@x.io", 1005))])
    op(http, sandbox, 2, token_accounts=[ta("t1", ("b@x.io", 1005))])
    assert sandbox.bindings_of("t1") == {0: "u1", 1005: "b@x.io"}
    assert sandbox.tokens_of("a@x.io", 1005) == set()


def test_a_later_account_of_the_same_type_in_one_list_wins(sandbox: SandboxServer,
                                                           http: requests.Session) -> None:
    op(http, sandbox, 2, token_accounts=[ta("t1", "926@126.com", "1527000000")])
    assert sandbox.bindings_of("t1") == {0: "1527000000"}
    assert sandbox.tokens_of("926@126.com") == set()


def test_op3_unbinds_only_the_listed_accounts_that_are_bound(sandbox: SandboxServer,
                                                             http: requests.Session) -> None:
    op(http, sandbox, 2, token_accounts=[ta("t1", "u1", ("a@x.io", 1005))])
    assert op(http, sandbox, 3, token_accounts=[ta("t1", "other")])["result"] == ["0"]
    assert sandbox.bindings_of("t1") == {0: "u1", 1005: "a@x.io"}
    op(http, sandbox, 3, token_accounts=[ta("t1", ("a@x.io", 1005))])
    assert sandbox.bindings_of("t1") == {0: "u1"}
    assert sandbox.tokens_of("a@x.io", 1005) == set()


def test_op4_unbinds_every_account_of_each_token(sandbox: SandboxServer,
                                                 http: requests.Session) -> None:
    op(http, sandbox, 2, token_accounts=[ta("t1", "u1", (PHONE, 1002)), ta("t2", "u1")])
    answer = op(http, sandbox, 4, token_list=["t1", "never-bound"])
    assert answer == {"ret_code": 0, "err_msg": "NO_ERROR", "result": ["0", "0"]}
    assert sandbox.bindings_of("t1") == {}
    assert sandbox.tokens_of("u1") == {"t2"}
    assert sandbox.tokens_of(PHONE, 1002) == set()


def test_op5_unbinds_the_account_of_that_type_from_all_tokens(sandbox: SandboxServer,
                                                              http: requests.Session) -> None:
    op(http, sandbox, 2, token_accounts=[ta("t1", "u1"), ta("t2", "u1", ("u1", 3))])
    answer = op(http, sandbox, 5, account_list=[{"account": "u1"}, {"account": "nobody"}])
    assert answer == {"ret_code": 0, "err_msg": "NO_ERROR", "result": ["0", "0"]}
    assert sandbox.tokens_of("u1") == set()
    assert sandbox.bindings_of("t1") == {}
    assert sandbox.bindings_of("t2") == {3: "u1"}


def test_query_reports_what_is_not_bound(sandbox: SandboxServer, http: requests.Session) -> None:
    op(http, sandbox, 2, token_accounts=[ta("t1", ("u1", 5))])
    none = query(http, sandbox, {"operator_type": 2, "token_list": ["t9"]})
    assert (none["retCode"], none["errMsg"], none["result"]) == \
        (1008027, "batch op, total error", ["10110008"])
    assert none["token_accounts"] == [{"token": "t9", "account_list": []}]
    # a top-level account_type is the default type of the accounts that lack one
    some = query(http, sandbox, {"operator_type": 1, "account_type": 5,
                                 "account_list": [{"account": "u1"}, {"account": "u2"}]})
    assert (some["retCode"], some["result"]) == (1008026, ["0", "10110008"])


@pytest.mark.parametrize(("payload", "code"), [
    ({"token_list": ["t1"]}, 1008002),
    ({"operator_type": 1, "token_list": ["t1"]}, 1008002),
    ({"operator_type": 3, "token_list": ["t1"]}, 1008007),
    ({"operator_type": 1, "account_list": [{"account": "u\n"}]}, 1008007),
])
def test_query_validation(sandbox: SandboxServer, http: requests.Session,
                          payload: dict[str, Any], code: int) -> None:
    answer = query(http, sandbox, payload)
    assert (answer["retCode"], answer["result"]) == (code, [])


# -- auth --

@pytest.mark.parametrize("auth", ["sign", "basic"])
def test_both_auth_methods_are_accepted(sandbox: SandboxServer, http: requests.Session,
                                        auth: str) -> None:
    response = post(http, sandbox, {"operator_type": 4, "token_list": ["t1"]}, auth=auth)
    assert response.json()["ret_code"] == 0


@pytest.mark.parametrize("kwargs", [
    {"auth": "sign", "secret": "wrong"},
    {"auth": "basic", "secret": "wrong"},
    {"auth": "sign", "access_id": "1500000002"},
    {"auth": "basic", "access_id": "1500000002"},
    {"auth": "sign", "skew_s": -3600},
    {"auth": "sign", "skew_s": 3600},
    {"auth": "none"},
], ids=["sign-secret", "basic-secret", "sign-id", "basic-id", "skew-past", "skew-future", "none"])
def test_auth_failures_are_1008003_and_change_nothing(sandbox: SandboxServer,
                                                      http: requests.Session,
                                                      kwargs: dict[str, Any]) -> None:
    if "skew_s" in kwargs:  # from the time of the request, not of the test's collection
        kwargs = {"auth": "sign", "timestamp": int(time.time()) + kwargs["skew_s"]}
    response = post(http, sandbox, {"operator_type": 2, "token_accounts": [ta("t1", "u1")]},
                    **kwargs)
    assert response.status_code == 200
    assert response.json() == {"ret_code": 1008003, "err_msg": "auth failure", "result": []}
    assert sandbox.bindings_of("t1") == {}


def test_signature_covers_the_exact_body_bytes(sandbox: SandboxServer,
                                               http: requests.Session) -> None:
    signed = b'{"operator_type":4,"token_list":["t1"]}'
    headers = sign_headers(SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY, signed, int(time.time()))
    tampered = http.post(sandbox.url + BATCH_PATH, data=signed.replace(b"t1", b"t2"),
                         headers=headers, timeout=5)
    assert tampered.json()["ret_code"] == 1008003
    assert http.post(sandbox.url + BATCH_PATH, data=signed, headers=headers,
                     timeout=5).json()["ret_code"] == 0


def test_skew_inside_the_window_is_accepted(sandbox: SandboxServer,
                                            http: requests.Session) -> None:
    response = post(http, sandbox, {"operator_type": 4, "token_list": ["t1"]},
                    timestamp=int(time.time()) - 500)
    assert response.json()["ret_code"] == 0


def test_query_auth_failure_is_camel_case(sandbox: SandboxServer, http: requests.Session) -> None:
    answer = query(http, sandbox, {"operator_type": 2, "token_list": ["t1"]}, secret="wrong")
    assert answer == {"retCode": 1008003, "errMsg": "auth failure", "result": []}


# -- validation --

def _tas(n: int) -> list[dict[str, Any]]:
    return [ta(f"t{i}", "u") for i in range(n)]


INVALID = [
    (b"not json", 1008001),
    (b"[1, 2]", 1008001),
    (b"\xff\xfe", 1008001),
    (b"", 1008001),
    ({}, 1008002),
    ({"operator_type": None, "token_list": ["t"]}, 1008002),
    ({"operator_type": 2}, 1008002),
    ({"operator_type": 2, "token_accounts": []}, 1008002),
    ({"operator_type": 4, "token_accounts": _tas(1)}, 1008002),
    ({"operator_type": 5, "token_list": ["t"]}, 1008002),
    ({"operator_type": 0, "token_list": ["t"]}, 1008007),
    ({"operator_type": 6, "token_list": ["t"]}, 1008007),
    ({"operator_type": True, "token_accounts": _tas(1)}, 1008007),
    ({"operator_type": "2", "token_accounts": _tas(1)}, 1008007),
    ({"operator_type": 2.0, "token_accounts": _tas(1)}, 1008007),
    ({"operator_type": 2, "token_accounts": _tas(21)}, 1008007),
    ({"operator_type": 4, "token_list": [f"t{i}" for i in range(21)]}, 1008007),
    ({"operator_type": 5, "account_list": [{"account": f"u{i}"} for i in range(21)]}, 1008007),
    ({"operator_type": 2, "token_accounts": "t1"}, 1008007),
    ({"operator_type": 2, "token_accounts": ["t1"]}, 1008007),
    ({"operator_type": 2, "token_accounts": [{"token": "t1"}]}, 1008007),
    ({"operator_type": 2, "token_accounts": [{"token": "t1", "account_list": []}]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", *[f"u{i}" for i in range(21)])]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("", "u1")]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("x" * 65, "u1")]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("é" * 33, "u1")]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t 1", "u1")]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t\x001", "u1")]}, 1008007),
    ({"operator_type": 4, "token_list": [42]}, 1008007),
    ({"operator_type": 4, "token_list": ["t\t"]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", "")]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", "u" * 101)]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", "u\n1")]}, 1008007),
    ({"operator_type": 2, "token_accounts": [{"token": "t1", "account_list": [{"account": 7}]}]},
     1008007),
    ({"operator_type": 2, "token_accounts": [{"token": "t1", "account_list": ["u1"]}]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", ("u1", 17))]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", ("u1", 988))]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", ("u1", 1016))]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", ("u1", -1))]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", ("u1", True))]}, 1008007),
    ({"operator_type": 2, "token_accounts": [
        {"token": "t1", "account_list": [{"account": "u1", "account_type": "0"}]}]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", ("13711112222", 1002))]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", ("+12345", 1002))]}, 1008007),
    ({"operator_type": 2, "token_accounts": [ta("t1", ("+1234567890123456", 1002))]}, 1008007),
    ({"operator_type": 5, "account_list": ["u1"]}, 1008007),
    ({"operator_type": 5, "account_list": [{"account": "u1", "account_type": 999999}]}, 1008007),
]


@pytest.mark.parametrize(("payload", "code"), INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_calls_get_the_service_code(sandbox: SandboxServer, http: requests.Session,
                                            payload: Any, code: int) -> None:
    raw = payload if isinstance(payload, bytes) else None
    answer = post(http, sandbox, payload, raw=raw).json()
    assert (answer["ret_code"], answer["result"]) == (code, [])
    assert sandbox.bindings_of("t1") == {}
    assert sandbox.stats()["ret_codes"] == {str(code): 1}


@pytest.mark.parametrize("payload", [
    {"operator_type": 2, "platform": "android", "account_type": 1,
     "token_accounts": [ta("t1", "u1")]},
    {"operator_type": 2, "token_accounts": [ta("x" * 64, "u" * 100, "John Smith")]},
    {"operator_type": 2, "token_accounts": [ta("t1", ("+123456", 1002), ("u1", 16),
                                               ("12345", 991), ("u1", 1015))]},
    {"operator_type": 2, "token_accounts": _tas(20)},
    {"operator_type": 2, "token_accounts": [ta("t1", *[(f"u{i}", i) for i in range(17)],
                                               ("u", 989), ("u", 1001), ("u", 997))]},
    {"operator_type": 5, "account_list": [{"account": f"u{i}"} for i in range(20)]},
])
def test_valid_edge_cases_are_accepted(sandbox: SandboxServer, http: requests.Session,
                                       payload: dict[str, Any]) -> None:
    assert post(http, sandbox, payload).json()["ret_code"] == 0


# -- per-item failures and the test-token conventions --

def test_an_invalid_token_fails_its_item_only(sandbox: SandboxServer,
                                              http: requests.Session) -> None:
    answer = op(http, sandbox, 2, token_accounts=[ta("t1", "u1"), ta("invalid-1", "u1")])
    assert answer == {"ret_code": 1008026, "err_msg": "batch op, partly error",
                      "result": ["0", "1008006"]}
    assert sandbox.tokens_of("u1") == {"t1"}
    assert sandbox.bindings_of("invalid-1") == {}


def test_only_invalid_tokens_is_a_total_error(sandbox: SandboxServer,
                                              http: requests.Session) -> None:
    answer = op(http, sandbox, 4, token_list=["invalid-1", "invalid-2"])
    assert answer == {"ret_code": 1008027, "err_msg": "batch op, total error",
                      "result": ["1008006", "1008006"]}


def test_a_reject_token_refuses_the_whole_call(sandbox: SandboxServer,
                                               http: requests.Session) -> None:
    answer = op(http, sandbox, 2, token_accounts=[ta("t1", "u1"), ta("reject-1", "u1")])
    assert (answer["ret_code"], answer["result"]) == (1008007, [])
    assert sandbox.tokens_of("u1") == set()
    assert op(http, sandbox, 2, token_accounts=[ta("t1", "u1")])["ret_code"] == 0


def test_the_test_prefixes_are_configurable(http: requests.Session) -> None:
    with SandboxServer(invalid_token_prefix="bad:", reject_token_prefix="") as sandbox:
        answer = op(http, sandbox, 4, token_list=["bad:1", "invalid-1", "reject-1"])
        assert answer["result"] == ["1008006", "0", "0"]


# -- fault injection --

@pytest.mark.parametrize(("fault", "status", "ret_code", "retry_after"), [
    ("http_500", 500, None, None),
    ("http_503", 503, None, None),
    ("http_429", 429, None, "0.25"),
    ("1008004", 200, 1008004, None),
    ("1008028", 200, 1008028, "0.25"),
])
def test_answer_faults(http: requests.Session, fault: str, status: int, ret_code: int | None,
                       retry_after: str | None) -> None:
    with SandboxServer(fault_rate=1.0, faults=[fault], seed=1, retry_after_s=0.25) as sandbox:
        response = post(http, sandbox, {"operator_type": 2, "token_accounts": [ta("t1", "u1")]})
        assert response.status_code == status
        assert response.headers.get("Retry-After") == retry_after
        if ret_code is not None:
            assert response.json()["ret_code"] == ret_code
        assert sandbox.bindings_of("t1") == {}
        assert sandbox.stats()["faults"] == {fault: 1}


def test_drop_closes_the_connection_without_an_answer(http: requests.Session) -> None:
    with SandboxServer(fault_rate=1.0, faults=["drop"]) as sandbox:
        with pytest.raises(requests.ConnectionError):
            post(http, sandbox, {"operator_type": 2, "token_accounts": [ta("t1", "u1")]})
        assert sandbox.bindings_of("t1") == {}
        sandbox.configure(fault_rate=0.0)
        assert post(http, sandbox, {"operator_type": 4, "token_list": ["t1"]}).ok


def test_timeout_answers_late_but_applies_the_call(http: requests.Session) -> None:
    with SandboxServer(fault_rate=1.0, faults=["timeout"], slow_ms=500) as sandbox:
        with pytest.raises(requests.ReadTimeout):
            post(http, sandbox, {"operator_type": 2, "token_accounts": [ta("t1", "u1")]},
                 timeout=0.1)
        wait_until(lambda: sandbox.bindings_of("t1") == {0: "u1"})
        sandbox.configure(slow_ms=150)
        started = time.monotonic()
        answer = post(http, sandbox, {"operator_type": 4, "token_list": ["t1"]}).json()
        assert time.monotonic() - started >= 0.15
        assert answer["ret_code"] == 0
        assert sandbox.stats()["faults"] == {"timeout": 2}


def _outcomes(seed: int, calls: int) -> list[int]:
    with SandboxServer(fault_rate=0.5, faults=["1008004", "1008028"], seed=seed) as sandbox, \
            requests.Session() as session:
        return [op(session, sandbox, 4, token_list=["t1"])["ret_code"] for _ in range(calls)]


def test_a_seed_gives_a_reproducible_fault_sequence() -> None:
    first = _outcomes(3, 40)
    assert first == _outcomes(3, 40)
    assert {0, 1008004, 1008028} <= set(first)
    assert first != _outcomes(4, 40)


# -- runtime configuration --

def test_configure_changes_credentials_and_faults_at_runtime(sandbox: SandboxServer,
                                                             http: requests.Session) -> None:
    payload = {"operator_type": 4, "token_list": ["t1"]}
    sandbox.configure(access_id="42", secret_key="new-secret")
    assert post(http, sandbox, payload).json()["ret_code"] == 1008003
    assert post(http, sandbox, payload, access_id="42", secret="new-secret",
                auth="basic").json()["ret_code"] == 0
    sandbox.configure(fault_rate=1.0, faults=["http_503"])
    assert post(http, sandbox, payload, access_id="42", secret="new-secret").status_code == 503
    sandbox.configure(fault_rate=0.0)
    assert post(http, sandbox, payload, access_id="42", secret="new-secret").status_code == 200


def test_hold_keeps_answers_back_until_release(sandbox: SandboxServer) -> None:
    answers: list[dict[str, Any]] = []

    def call() -> None:
        with requests.Session() as session:
            answers.append(op(session, sandbox, 2, token_accounts=[ta("t1", "u1")]))

    sandbox.hold()
    caller = threading.Thread(target=call)
    caller.start()
    try:
        # received, counted and applied at once; only the answer waits
        wait_until(lambda: sandbox.stats()["calls"] == 1 and sandbox.bindings_of("t1") == {0: "u1"})
        assert caller.is_alive() and answers == []
    finally:
        sandbox.release()
    caller.join(10)
    assert [a["ret_code"] for a in answers] == [0]


def test_calls_in_flight_are_counted_until_answered(sandbox: SandboxServer) -> None:
    answers: list[int] = []

    def call(k: int) -> None:
        with requests.Session() as session:
            answers.append(post(session, sandbox, {"operator_type": 4,
                                                   "token_list": [f"t{k}"]}).status_code)

    sandbox.hold()
    callers = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    for caller in callers:
        caller.start()
    try:
        wait_until(lambda: sandbox.stats()["in_flight"] == 3)
        assert sandbox.stats()["in_flight_max"] == 3 and answers == []
    finally:
        sandbox.release()
    for caller in callers:
        caller.join(10)
    assert answers == [200, 200, 200]
    wait_until(lambda: sandbox.stats()["in_flight"] == 0)
    sandbox.reset()  # the most at once starts again from the calls in flight (none)
    assert (sandbox.stats()["in_flight"], sandbox.stats()["in_flight_max"]) == (0, 0)


def test_latency_delays_every_answer(sandbox: SandboxServer, http: requests.Session) -> None:
    sandbox.configure(latency_ms=100)
    started = time.monotonic()
    post(http, sandbox, {"operator_type": 4, "token_list": ["t1"]})
    query(http, sandbox, {"operator_type": 2, "token_list": ["t1"]})
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("changes", [
    {"fault_rate": 1.5}, {"fault_rate": -0.1}, {"faults": ["nope"]}, {"latency_ms": -1},
    {"latency_ms": float("nan")}, {"secret_key": ""}, {"seed": "x"}, {"port": 1}, {"faults": 5},
])
def test_configure_refuses_bad_values_and_changes_nothing(sandbox: SandboxServer,
                                                          changes: dict[str, Any]) -> None:
    before = sandbox.config
    with pytest.raises(SandboxConfigError):
        sandbox.configure(**changes)
    assert sandbox.config == before


def test_config_endpoint(sandbox: SandboxServer, http: requests.Session) -> None:
    response = http.post(sandbox.url + "/sandbox/config", timeout=5,
                         json={"fault_rate": 1, "faults": "1008004", "latency_ms": 0})
    assert response.status_code == 200
    shown = response.json()
    assert (shown["fault_rate"], shown["faults"]) == (1.0, ["1008004"])
    assert "secret_key" not in shown and SANDBOX_SECRET_KEY not in response.text
    assert op(http, sandbox, 4, token_list=["t1"])["ret_code"] == 1008004
    bad = http.post(sandbox.url + "/sandbox/config", json={"fault_rate": 2}, timeout=5)
    assert bad.status_code == 400 and "fault_rate" in bad.json()["error"]


# -- stats, admin endpoints, HTTP behaviour --

def test_stats_count_calls_items_codes_and_reset_clears_them(sandbox: SandboxServer,
                                                             http: requests.Session) -> None:
    op(http, sandbox, 2, token_accounts=[ta("t1", "u1"), ta("t2", "u1"), ta("invalid-3", "u")])
    op(http, sandbox, 4, token_list=["t1", "t2"])
    op(http, sandbox, 5, account_list=[{"account": "u1"}])
    op(http, sandbox, 2, token_accounts=_tas(21))
    post(http, sandbox, {"operator_type": 4, "token_list": ["t1"]}, secret="wrong")
    query(http, sandbox, {"operator_type": 2, "token_list": ["t1"]})
    stats = sandbox.stats()
    assert stats == {"calls": 5, "queries": 1, "items": 3 + 2 + 1 + 21 + 1,
                     "calls_by_op": {"2": 2, "4": 2, "5": 1},
                     "ret_codes": {"1008026": 1, "0": 2, "1008007": 1, "1008003": 1},
                     "faults": {}, "max_items_per_call": 21, "items_per_call": [3, 2, 1, 21, 1],
                     "unapplied": 0, "in_flight": 0, "in_flight_max": 1}  # one call at a time
    assert http.get(sandbox.url + "/sandbox/stats", timeout=5).json() == stats

    op(http, sandbox, 2, token_accounts=[ta("t1", "u1")])
    assert http.post(sandbox.url + "/sandbox/reset", timeout=5).json() == {"ok": True}
    assert sandbox.bindings_of("t1") == {}
    assert sandbox.stats()["calls"] == 0 and sandbox.stats()["items_per_call"] == []
    sandbox.reset()
    assert sandbox.stats()["ret_codes"] == {}


def test_admin_and_unknown_paths(sandbox: SandboxServer, http: requests.Session) -> None:
    assert http.get(sandbox.url + "/healthz", timeout=5).json() == {"ok": True}
    assert http.get(sandbox.url + "/nope", timeout=5).status_code == 404
    wrong_method = http.get(sandbox.url + BATCH_PATH, timeout=5)
    assert (wrong_method.status_code, wrong_method.headers["Allow"]) == (405, "POST")
    assert sandbox.url.startswith("http://127.0.0.1:") and not sandbox.url.endswith("/")


def test_connections_are_kept_alive(sandbox: SandboxServer) -> None:
    conn = HTTPConnection("127.0.0.1", int(sandbox.url.rsplit(":", 1)[1]), timeout=5)
    try:
        body = b'{"operator_type":4,"token_list":["t1"]}'
        sockets = []
        for _ in range(3):
            headers = sign_headers(SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY, body, int(time.time()))
            conn.request("POST", BATCH_PATH, body=body, headers=headers)
            response = conn.getresponse()
            assert json.loads(response.read())["ret_code"] == 0
            assert not response.will_close
            sockets.append(conn.sock)
        assert sockets[0] is not None and sockets == [sockets[0]] * 3
    finally:
        conn.close()


def test_a_body_too_large_is_refused(sandbox: SandboxServer, http: requests.Session) -> None:
    response = post(http, sandbox, raw=b"x" * (2 << 20))
    assert response.status_code == 413


def test_concurrent_calls_keep_both_indexes_consistent(sandbox: SandboxServer) -> None:
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with requests.Session() as session:
                for i in range(25):
                    token = f"t{n}-{i}"
                    op(session, sandbox, 2, token_accounts=[ta(token, f"u{i % 5}")])
                    if i % 2:
                        op(session, sandbox, 4, token_list=[token])
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    bound = {f"t{n}-{i}" for n in range(8) for i in range(0, 25, 2)}
    assert set().union(*(sandbox.tokens_of(f"u{k}") for k in range(5))) == bound
    assert all(sandbox.bindings_of(t) == {0: f"u{int(t.split('-')[1]) % 5}"} for t in bound)
    assert sandbox.stats()["calls"] == 8 * (25 + 12)


def test_stop_is_idempotent_and_frees_the_port() -> None:
    server = SandboxServer().start()
    url = server.url
    server.stop()
    server.stop()
    with requests.Session() as session, pytest.raises(requests.ConnectionError):
        session.get(url + "/healthz", timeout=1)
    with pytest.raises(RuntimeError):
        server.start()


# -- command line --


def test_lost_answers_like_an_accepted_call_and_never_applies(http: requests.Session) -> None:
    with SandboxServer(fault_rate=1.0, faults=["lost"]) as sandbox:
        answer = op(http, sandbox, 2, token_accounts=[ta("t1", "u1"), ta("invalid-t", "u2")])
        assert (answer["ret_code"], answer["result"]) == (1008026, ["0", "1008006"])
        sandbox.configure(fault_rate=0.0)
        query = post(http, sandbox, {"operator_type": 2, "token_list": ["t1"]},
                     path=QUERY_PATH).json()
        assert query["result"] == ["10110008"] and sandbox.bindings_of("t1") == {}
        assert sandbox.stats()["faults"] == {"lost": 1}
        assert op(http, sandbox, 2, token_accounts=[ta("t1", "u1")])["ret_code"] == 0
        assert sandbox.bindings_of("t1") == {0: "u1"}


def test_lost_is_drawn_only_when_listed() -> None:
    with SandboxServer() as sandbox:
        assert "lost" not in sandbox.config.faults
        sandbox.configure(faults=["lost", "drop"])
        assert sandbox.config.faults == ("lost", "drop")


def test_accepted_calls_apply_later_in_the_order_accepted() -> None:
    from worker.sandbox.protocol import Request, parse_batch
    from worker.sandbox.state import Bindings

    now = [100.0]
    bindings = Bindings(clock=lambda: now[0])

    def call(payload: dict[str, Any], delay_s: float) -> list[str]:
        request = parse_batch(payload)
        assert isinstance(request, Request)
        return bindings.apply(request, "", delay_s=delay_s)

    assert call({"operator_type": 2, "token_accounts": [ta("t1", "u1")]}, 1.0) == ["0"]
    # accepted later with no delay, it still waits for the call accepted before it
    call({"operator_type": 4, "token_list": ["t1"]}, 0.0)
    assert bindings.accounts_of("t1") == {} and bindings.pending() == 2
    now[0] = 100.999
    assert bindings.tokens_of("u1") == set()
    now[0] = 101.0
    # both applied, in order: the bind then the unbind
    assert bindings.accounts_of("t1") == {} and bindings.pending() == 0
    assert [op for op, _ in bindings.applied()] == [2, 4]


def test_apply_delay_hides_a_call_from_queries_until_it_applies(http: requests.Session) -> None:
    with SandboxServer(apply_delay_ms=150) as sandbox:
        assert op(http, sandbox, 2, token_accounts=[ta("t1", "u1")])["ret_code"] == 0
        started = time.monotonic()
        query = post(http, sandbox, {"operator_type": 1, "account_list": [{"account": "u1"}]},
                     path=QUERY_PATH).json()
        if time.monotonic() - started < 0.15:  # asked before the delay was over
            assert query["account_tokens"][0]["token_list"] == []
        wait_until(lambda: sandbox.tokens_of("u1") == {"t1"})
        assert sandbox.stats()["unapplied"] == 0
        sandbox.configure(apply_delay_ms=60_000)
        op(http, sandbox, 4, token_list=["t1"])
        assert sandbox.stats()["unapplied"] == 1 and sandbox.tokens_of("u1") == {"t1"}
