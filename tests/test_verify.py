"""The postcondition checks of SPEC §6.1 (worker/verify.py) against the sandbox's binding model.

The property: for any state the sandbox's bindings can reach and any intent, the query answers
of the real sandbox (over HTTP) show the intent's postcondition exactly when applying the intent
to that state would change nothing, i.e. when its effect is visible. So a lost call is caught
unless the state already was what it asked for, and an applied one is always seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from worker.auth import basic_header
from worker.model import Account
from worker.sandbox.protocol import BATCH_PATH, QUERY_PATH, Request, parse_batch
from worker.sandbox.server import SandboxServer
from worker.sandbox.state import Bindings
from worker.settings import SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY
from worker.verify import (
    QUERY_ACCOUNTS,
    QUERY_TOKENS,
    Needs,
    Observed,
    QueryCall,
    Subject,
    needs,
    plan,
    read_answer,
    shown,
)

TOKENS = ("t1", "t2", "t3")
ACCOUNTS = tuple(Account(a, t) for a in ("u1", "u2", "u3") for t in (0, 1005))


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers.update(basic_header(SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY))
        yield session


def payload(subject: Subject) -> dict[str, Any]:
    """The batchoperate body of one intent."""
    accounts = [a.to_json() for a in subject.accounts]
    if subject.operator_type == 4:
        return {"operator_type": 4, "token_list": [subject.token]}
    if subject.operator_type == 5:
        return {"operator_type": 5, "account_list": accounts}
    return {"operator_type": subject.operator_type,
            "token_accounts": [{"token": subject.token, "account_list": accounts}]}


def request_of(subject: Subject) -> Request:
    request = parse_batch(payload(subject))
    assert isinstance(request, Request)
    return request


def state_of(bindings: Bindings) -> tuple[Any, ...]:
    """Every binding over the pools, both ways."""
    return (bindings.snapshot(TOKENS),
            {(a.account, a.account_type): bindings.tokens_of(a.account, a.account_type)
             for a in ACCOUNTS})


def observe(http: requests.Session, sandbox: SandboxServer, subject: Subject) -> Observed:
    seen = Observed()
    for call in plan([needs(subject)]):
        response = http.post(sandbox.url + QUERY_PATH, data=json.dumps(call.body()), timeout=5)
        data = response.json()
        assert data["retCode"] in (0, 1008026, 1008027), data
        read_answer(call, data, seen)
    return seen


@st.composite
def subjects(draw: st.DrawFn) -> Subject:
    op = draw(st.integers(1, 5))
    if op == 5:
        return Subject(5, None, (draw(st.sampled_from(ACCOUNTS)),))
    token = draw(st.sampled_from(TOKENS))
    if op == 4:
        return Subject(4, token, ())
    # repeats of a type are allowed: the last account of a type is the one a bind leaves
    accounts = tuple(dict.fromkeys(draw(st.lists(st.sampled_from(ACCOUNTS), min_size=1,
                                                  max_size=4))))
    return Subject(op, token, accounts)


@given(history=st.lists(subjects(), max_size=8), subject=subjects())
def test_shown_exactly_when_the_intent_changes_nothing(
        module_sandbox: SandboxServer, http: requests.Session, history: list[Subject],
        subject: Subject) -> None:
    module_sandbox.reset()
    model = Bindings()
    for earlier in history:
        assert http.post(module_sandbox.url + BATCH_PATH, data=json.dumps(payload(earlier)),
                         timeout=5).json()["ret_code"] == 0
        model.apply(request_of(earlier), "")
    before = state_of(model)
    model.apply(request_of(subject), "")
    a_no_op = state_of(model) == before
    # not applied (a lost call): shown only when the state already was what it asks for
    assert shown(subject, observe(http, module_sandbox, subject)) == a_no_op
    http.post(module_sandbox.url + BATCH_PATH, data=json.dumps(payload(subject)), timeout=5)
    # applied: always shown
    assert shown(subject, observe(http, module_sandbox, subject))


def test_a_bind_is_checked_per_account_and_its_token_for_exclusivity() -> None:
    subject = Subject(2, "t1", (Account("u1", 0), Account("u2", 0), Account("a@b.c", 1005)))
    need = needs(subject)
    # two accounts of type 0: the service keeps the last one, so that is what is checked
    assert need == Needs((("u2", 0), ("a@b.c", 1005)), ("t1",))
    assert needs(Subject(1, "t1", (Account("u1", 0),))) == Needs((("u1", 0),), ())
    assert needs(Subject(4, "t1", ())) == Needs((), ("t1",))
    assert needs(Subject(5, None, (Account("u1", 3),))) == Needs((("u1", 3),), ())


def test_queries_carry_at_most_20_keys_and_each_key_once() -> None:
    wanted = [Needs(tuple((f"u{k}", 0) for k in range(n, n + 15)), (f"t{n}",))
              for n in range(0, 30, 5)]
    calls = plan(wanted)
    accounts = [k for c in calls for k in c.accounts]
    tokens = [t for c in calls for t in c.tokens]
    assert all(c.size <= 20 for c in calls)
    assert sorted(accounts) == sorted({(f"u{k}", 0) for k in range(40)})
    assert len(tokens) == 6 and len(calls) == 3
    assert calls[0].body()["account_list"][0] == {"account": "u0", "account_type": 0}
    assert calls[-1].body() == {"operator_type": 2, "token_list": tokens}


def test_an_answer_without_types_checks_binds_but_not_exclusivity() -> None:
    subject = Subject(2, "t1", (Account("u1", 0),))
    seen = Observed()
    read_answer(QueryCall(QUERY_ACCOUNTS, accounts=(("u1", 0),)),
                {"retCode": 0, "result": ["0"],
                 "account_tokens": [{"account": "u1", "token_list": ["t1"]}]}, seen)
    # the EN example's op-2 answer: accounts without types, so exclusivity cannot be judged
    read_answer(QueryCall(QUERY_TOKENS, tokens=("t1",)),
                {"retCode": 0, "result": ["0"], "token_accounts": [
                    {"token": "t1", "account_list": [{"account": "u1"}, {"account": "old"}]}]},
                seen)
    assert shown(subject, seen)
    # with types, another account of a listed type is caught
    read_answer(QueryCall(QUERY_TOKENS, tokens=("t1",)),
                {"retCode": 0, "result": ["0"], "token_accounts": [
                    {"token": "t1", "account_list": [{"account": "u1", "account_type": 0},
                                                     {"account": "old", "account_type": 0}]}]},
                seen)
    assert not shown(subject, seen)


def test_a_key_whose_answer_failed_or_is_missing_is_not_shown() -> None:
    subject = Subject(5, None, (Account("u1", 0),))
    seen = Observed()
    call = QueryCall(QUERY_ACCOUNTS, accounts=(("u1", 0),))
    assert read_answer(call, {"retCode": 1008027, "result": ["1008004"]}, seen) == 0
    assert not shown(subject, seen)
    assert read_answer(call, {"retCode": 0, "result": ["0"], "account_tokens": []}, seen) == 0
    assert not shown(subject, seen)
    # "nothing bound" is an answer: the account has no token
    assert read_answer(call, {"retCode": 1008027, "result": ["10110008"]}, seen) == 1
    assert shown(subject, seen)
    # an entry for another type does not answer for this one
    other = Observed()
    read_answer(call, {"retCode": 0, "result": ["0"], "account_tokens": [
        {"account": "u1", "account_type": 7, "token_list": []}]}, other)
    assert not shown(subject, other)
