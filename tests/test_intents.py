"""Every validation rule of SPEC §4, through the Python API and through ``tpns-batcher enqueue``."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from worker.cli import main
from worker.errors import IdConflictError, IntentError
from worker.intents import _has_control, _has_surrogate, check_token, validate
from worker.model import Account, Intent
from worker.producer import Producer
from worker.settings import Settings

T = "0c2f8e1d"
OK = [{"account": "u1"}]

# (intent, field named in the refusal, a word of the rule)
INVALID: list[tuple[Any, str, str]] = [
    ([1, 2], "intent", "JSON object"),
    ({}, "operator_type", "required"),
    ({"operator_type": 0, "token": T}, "operator_type", "1 to 5"),
    ({"operator_type": 6, "token": T}, "operator_type", "1 to 5"),
    ({"operator_type": True, "token": T}, "operator_type", "integer"),
    ({"operator_type": "2", "token": T, "account_list": OK}, "operator_type", "integer"),
    ({"operator_type": 2.0, "token": T, "account_list": OK}, "operator_type", "integer"),
    ({"operator_type": 2, "account_list": OK}, "token", "required"),
    ({"operator_type": 2, "token": T}, "account_list", "required"),
    ({"operator_type": 2, "token": T, "account_list": []}, "account_list", "empty"),
    ({"operator_type": 2, "token": T, "account_list": {"account": "u"}}, "account_list", "list"),
    ({"operator_type": 2, "token": T, "account_list": [{"account": f"u{i}"} for i in range(21)]},
     "account_list", "at most 20"),
    ({"operator_type": 2, "token": T, "account_list": ["u1"]}, "account_list[0]", "object"),
    ({"operator_type": 2, "token": T, "account_list": [{"account_type": 0}]},
     "account_list[0].account", "required"),
    ({"operator_type": 2, "token": T, "account_list": [{"account": "u", "x": 1}]},
     "account_list[0].x", "not an allowed field"),
    ({"operator_type": 2, "token": T, "account_list": [{"account": "u"}, {"account": "u", "account_type": 1.0}]},
     "account_list[1].account_type", "must be an integer, not a float"),
    ({"operator_type": 4, "token": ""}, "token", "empty"),
    ({"operator_type": 4, "token": 42}, "token", "string"),
    ({"operator_type": 4, "token": "x" * 65}, "token", "64 bytes"),
    ({"operator_type": 4, "token": "é" * 33}, "token", "64 bytes"),
    ({"operator_type": 4, "token": "a b"}, "token", "whitespace"),
    ({"operator_type": 4, "token": "a\tb"}, "token", "whitespace"),
    ({"operator_type": 4, "token": "a\x00b"}, "token", "control"),
    ({"operator_type": 4, "token": T, "account_list": OK}, "account_list", "not allowed with operator_type 4"),
    ({"operator_type": 4, "token": T, "account": "u"}, "account", "not allowed"),
    ({"operator_type": 4, "token": T, "platform": "android"}, "platform", "not a known field"),
    ({"operator_type": 5}, "account", "required"),
    ({"operator_type": 5, "account": "u", "token": T}, "token", "not allowed with operator_type 5"),
    ({"operator_type": 5, "account": ""}, "account", "empty"),
    ({"operator_type": 5, "account": "u" * 101}, "account", "100 characters"),
    ({"operator_type": 5, "account": "a\nb"}, "account", "control"),
    ({"operator_type": 5, "account": 7}, "account", "string"),
    ({"operator_type": 5, "account": "u", "account_type": 17}, "account_type", "not a TPNS account type"),
    ({"operator_type": 5, "account": "u", "account_type": 988}, "account_type", "not a TPNS account type"),
    ({"operator_type": 5, "account": "u", "account_type": 1016}, "account_type", "not a TPNS account type"),
    ({"operator_type": 5, "account": "u", "account_type": float("nan")}, "account_type", "integer"),
    ({"operator_type": 5, "account": "u", "account_type": "0"}, "account_type", "integer"),
    ({"operator_type": 5, "account": "u", "account_type": False}, "account_type", "integer"),
    ({"operator_type": 5, "account": "13711112222", "account_type": 1002}, "account", "E.164"),
    ({"operator_type": 5, "account": "+12345", "account_type": 1002}, "account", "E.164"),
    ({"operator_type": 5, "account": "+1234567890123456", "account_type": 1002}, "account", "E.164"),
    ({"operator_type": 2, "token": T, "account_list": [{"account": "+86 137", "account_type": 1002}]},
     "account_list[0].account", "E.164"),
    ({"operator_type": 1.0, "token": T}, "operator_type", "must be an integer from 1 to 5, not a float"),
    ({"operator_type": 4, "token": "\ud800"}, "token", "valid Unicode"),
    ({"operator_type": 4, "token": "a\x00"}, "token", "control"),
    ({"operator_type": 5, "account": "x\udfff"}, "account", "valid Unicode"),
    ({"operator_type": 4, "token": T, "app": "\ud800"}, "app", "valid Unicode"),
    ({"operator_type": 4, "token": T, "id": "a\n"}, "id", "characters"),
    ({"operator_type": 4, "token": T, "\ud800": "x"}, "\\ud800", "not a known field"),
    ({"operator_type": 2, "token": T, "account_list": [{"account": f"u{i % 21}"} for i in range(42)]},
     "account_list", "at most 20"),
    ({"operator_type": 4, "token": T, "app": "windows"}, "app", "not a configured app"),
    ({"operator_type": 4, "token": T, "app": ""}, "app", "non-empty"),
    ({"operator_type": 4, "token": T, "id": ""}, "id", "non-empty"),
    ({"operator_type": 4, "token": T, "id": "a/b"}, "id", "characters"),
    ({"operator_type": 4, "token": T, "id": "x" * 65}, "id", "64"),
]

#: refusals only a Python caller can meet (JSON has no such values)
PY_INVALID: list[tuple[Any, str, str]] = [
    ({"operator_type": 5, "account": "u", "account_type": 10**5000}, "account_type", "not a TPNS account type"),
    ({"operator_type": 10**5000, "token": T}, "operator_type", "1 to 5"),
    ({"operator_type": 4, "token": T, 7: "x"}, "intent", "field names must be strings"),
    ({"operator_type": 2, "token": T, "account_list": [{"account": "u", ("k",): 1}]}, "account_list[0]",
     "field names must be strings"),
    (b'{"operator_type": 4}', "intent", "JSON object"),
    ({"operator_type": 4, "token": b"t"}, "token", "string"),
]

VALID: list[tuple[dict[str, Any], Intent]] = [
    ({"operator_type": 2, "token": T, "account_list": [{"account": "+8613711112222", "account_type": 1002}]},
     Intent(2, T, (Account("+8613711112222", 1002),))),
    ({"operator_type": 3, "token": T, "account_list": [{"account": "alice@example.com", "account_type": 1005}]},
     Intent(3, T, (Account("alice@example.com", 1005),))),
    ({"operator_type": 4, "token": T}, Intent(4, T, ())),
    ({"operator_type": 5, "account": "alice@example.com", "account_type": 1005},
     Intent(5, None, (Account("alice@example.com", 1005),))),
    ({"operator_type": 5, "account": "u1"}, Intent(5, None, (Account("u1", 0),))),
    ({"operator_type": 1, "token": T, "account_list": [{"account": "u-42"}], "id": "login-u42-0c2f"},
     Intent(1, T, (Account("u-42", 0),), id="login-u42-0c2f")),
    ({"operator_type": 2, "token": "x" * 64, "account_list": [{"account": "ü" * 100, "account_type": 16}],
      "app": "ios"}, Intent(2, "x" * 64, (Account("ü" * 100, 16),), app="ios")),
    ({"operator_type": 5, "account": "12345", "account_type": 991}, Intent(5, None, (Account("12345", 991),))),
    ({"operator_type": 5, "account": "u", "account_type": 989}, Intent(5, None, (Account("u", 989),))),
    ({"operator_type": 5, "account": "u", "account_type": 1001}, Intent(5, None, (Account("u", 1001),))),
]

#: exact repeats of an (account, account_type) are collapsed, first kept; other repeats are not repeats
COLLAPSED: list[tuple[list[dict[str, Any]], tuple[Account, ...]]] = [
    ([{"account": "u"}, {"account": "u"}], (Account("u"),)),
    ([{"account": "u"}, {"account": "u", "account_type": 0}], (Account("u"),)),
    ([{"account": "u", "account_type": 1}, {"account": "v"}, {"account": "u", "account_type": 1}],
     (Account("u", 1), Account("v"))),
    ([{"account": "u", "account_type": 1}, {"account": "u", "account_type": 2}], (Account("u", 1), Account("u", 2))),
    ([{"account": f"u{i % 20}"} for i in range(60)], tuple(Account(f"u{i}") for i in range(20))),
]


@pytest.mark.parametrize(("obj", "field", "word"), INVALID + PY_INVALID,
                         ids=[f"{f}:{w}" for _, f, w in INVALID + PY_INVALID])
def test_each_rule_refuses_with_the_field_and_the_rule(obj: Any, field: str, word: str) -> None:
    with pytest.raises(IntentError) as caught:
        validate(obj, apps={"default", "ios"})
    assert caught.value.field == field
    assert word in caught.value.rule
    assert str(caught.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("obj", "expected"), VALID)
def test_valid_intents_are_accepted_as_given(obj: dict[str, Any], expected: Intent) -> None:
    intent = validate(obj, apps={"default", "ios"})
    assert intent == expected
    assert validate(intent.to_json(), apps={"default", "ios"}) == intent


@pytest.mark.parametrize(("accounts", "expected"), COLLAPSED)
def test_exact_repeats_in_an_account_list_are_collapsed_first_kept(
        accounts: list[dict[str, Any]], expected: tuple[Account, ...]) -> None:
    intent = validate({"operator_type": 2, "token": T, "account_list": accounts})
    assert intent.accounts == expected


def test_any_python_object_is_refused_with_an_intent_error_only() -> None:
    class Hostile(dict):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            raise RuntimeError("boom")

    class Sneaky(str):
        def __str__(self) -> str:
            return "not what was checked"

    for obj in (None, 1, 1.5, float("inf"), "x", b"x", {1, 2}, [{}], object(), Hostile(operator_type=4)):
        with pytest.raises(IntentError):
            validate(obj)
    intent = validate({"operator_type": 4, "token": Sneaky("tok")})
    assert intent.token == "tok" and type(intent.token) is str


def _settings(redis_url: str, prefix: str, **extra: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                              "TPNS_APPS": "default,ios", **extra})


@pytest.fixture
def producer(redis_url: str, prefix: str) -> Iterator[Producer]:
    wakes: list[Any] = []
    p = Producer(redis_url, prefix, settings=_settings(redis_url, prefix), wake=wakes.extend)
    p.wakes = wakes  # type: ignore[attr-defined]
    yield p
    p.close()


def _keys(rconn: redis.Redis, prefix: str) -> list[str]:
    return sorted(set(rconn.scan_iter(match=f"{prefix}*")))  # SCAN may return a key twice


@pytest.mark.parametrize(("obj", "field", "word"), INVALID[:12] + INVALID[-8:] + PY_INVALID)
def test_the_python_api_stores_nothing_for_a_refused_intent(
        producer: Producer, rconn: redis.Redis, prefix: str, obj: Any, field: str, word: str) -> None:
    with pytest.raises(IntentError) as caught:
        producer.submit(obj)
    assert caught.value.field == field
    assert _keys(rconn, prefix) == [], "a refused intent left something in Redis"
    assert producer.wakes == []  # type: ignore[attr-defined]


def test_submit_many_stores_the_valid_and_reports_the_rest(producer: Producer, rconn: redis.Redis) -> None:
    good = [obj for obj, _ in VALID]
    mixed = [good[0], INVALID[3][0], good[2], INVALID[-1][0]]
    ids = producer.submit_many(mixed)
    assert ids[1] is None and ids[3] is None
    assert all(isinstance(i, str) for i in (ids[0], ids[2]))
    assert [s.state for s in producer.statuses([ids[0], ids[2]])] == ["queued", "queued"]  # type: ignore[union-attr,list-item]
    with pytest.raises(IntentError):
        producer.submit_many([good[4], INVALID[0][0]], strict=True)
    assert producer.stats()["states"]["queued"] == 2, "strict mode stored something before refusing"


def test_an_id_is_an_idempotency_key(producer: Producer) -> None:
    intent = {"operator_type": 4, "token": T, "id": "logout-1"}
    assert producer.submit(intent) == "logout-1"
    assert producer.submit(dict(intent)) == "logout-1"
    assert producer.stats()["states"]["queued"] == 1
    with pytest.raises(IdConflictError) as caught:
        producer.submit({"operator_type": 4, "token": "other", "id": "logout-1"})
    assert caught.value.field == "id" and "different payload" in caught.value.rule


def test_generated_ids_are_unique_url_safe_and_short(producer: Producer) -> None:
    ids = producer.submit_many([{"operator_type": 4, "token": f"t{i}"} for i in range(500)])
    assert len(set(ids)) == 500
    for i in ids:
        assert i is not None and len(i) <= 64 and all(c.isalnum() or c in "-_" for c in i)


@pytest.fixture
def cli_env(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI on the test's Redis and prefix, with the apps default and ios, sending no wakes."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("TPNS_REDIS_PREFIX", prefix)
    monkeypatch.setenv("TPNS_APPS", "default,ios")
    monkeypatch.delenv("TPNS_CONFIG_FILE", raising=False)
    monkeypatch.setattr("worker.producer.Producer._send_wakes", lambda self, wakes: None)


def test_enqueue_cli_prints_ids_in_order_and_refusals_with_line_numbers(
        redis_url: str, prefix: str, rconn: redis.Redis, cli_env: None) -> None:
    lines = [json.dumps(VALID[0][0]), "", json.dumps(INVALID[2][0]), "{not json",
             json.dumps(VALID[3][0]), "   ", json.dumps(INVALID[16][0]), json.dumps(VALID[2][0])]
    result = CliRunner().invoke(main, ["enqueue", "-"], input="\n".join(lines) + "\n",
                                catch_exceptions=False)
    assert result.exit_code == 1
    ids = result.stdout.split()
    assert len(ids) == 3
    refusals = result.stderr.strip().splitlines()
    assert refusals == ["line 3: operator_type: must be an integer from 1 to 5",
                        f"line 4: json: {refusals[1].split('json: ', 1)[1]}",
                        "line 7: token: must not be empty"]
    assert "not valid JSON" in refusals[1]
    producer = Producer(redis_url, prefix, settings=_settings(redis_url, prefix), wake=lambda w: None)
    statuses = producer.statuses(ids)
    producer.close()
    assert [s.operator_type for s in statuses if s] == [2, 5, 4], "ids are not in input order"
    # nothing of the refused lines reached Redis: three records, three queued
    records = [k for k in _keys(rconn, prefix) if k.startswith(f"{prefix}i:")]
    assert len(records) == 3


def test_enqueue_cli_exits_0_when_all_lines_are_accepted(cli_env: None, tmp_path: Any) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps({"operator_type": 4, "token": f"t{i}"}) for i in range(12000)))
    result = CliRunner().invoke(main, ["enqueue", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.split()) == 12000
    assert result.stderr == ""


def test_enqueue_cli_refuses_every_rule_by_line_and_stores_only_the_valid(
        prefix: str, rconn: redis.Redis, cli_env: None) -> None:
    lines: list[str] = []
    expected: dict[int, tuple[str, str]] = {}
    for k, (obj, field, word) in enumerate(INVALID):
        lines.append(json.dumps(VALID[k % len(VALID)][0] | {"id": f"ok-{k}"}))
        lines.append(json.dumps(obj))
        expected[len(lines)] = (field, word)
    result = CliRunner().invoke(main, ["enqueue", "-"], input="\n".join(lines) + "\n", catch_exceptions=False)
    assert result.exit_code == 1
    refusals = result.stderr.strip().splitlines()
    assert len(refusals) == len(INVALID)
    for line, (number, (field, word)) in zip(refusals, sorted(expected.items()), strict=True):
        assert line.startswith(f"line {number}: {field}: "), line
        assert word in line
    assert result.stdout.split() == [f"ok-{k}" for k in range(len(INVALID))]
    records = [k for k in _keys(rconn, prefix) if k.startswith(f"{prefix}i:")]
    assert len(records) == len(INVALID), "a refused line reached Redis"


# The checks take a fast path for ASCII text (issue 13: validation was most of submit_many's
# time); it must agree with the rules' plain definitions on every text.
TEXTS = st.one_of(st.text(), st.text(alphabet=st.characters(max_codepoint=127)),
                  st.text(alphabet=st.characters(codec=None, exclude_categories=())))


@given(TEXTS)
def test_the_fast_character_checks_agree_with_their_definitions(text: str) -> None:
    control = any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)
    assert _has_control(text) == control
    assert _has_surrogate(text) == any("\ud800" <= ch <= "\udfff" for ch in text)
    refused = (not text or len(text.encode("utf-8", "surrogatepass")) > 64
               or any("\ud800" <= ch <= "\udfff" for ch in text)
               or any(ch.isspace() for ch in text) or control)
    try:
        check_token(text)
    except IntentError:
        assert refused
    else:
        assert not refused
