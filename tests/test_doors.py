"""Every door (Python API, ``tpns-batcher enqueue`` as a real process, ``POST /v1/intents`` on a real
server) against a real Redis: the cases of issue 10, then fuzzed files and bodies.

Properties of every door: never a traceback or a 5xx; every non-blank line (item) gets exactly one
answer, an id or a refusal naming the line; every valid line is stored exactly once whatever its
neighbours; nothing of a refused line reaches Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fuzz import (
    Line,
    collapsed,
    examples,
    json_values,
    mixed_lines,
    near_valid_lines,
    valid_lines,
    with_ids,
)
from tests.support.live_server import serving
from worker.errors import IdConflictError, IntentError
from worker.producer import Producer
from worker.serve.app import create_app
from worker.settings import Settings

COMMAND = str(Path(sys.executable).with_name("tpns-batcher"))
HUGE_OP = b'{"operator_type": ' + b"4" * 5001 + b', "token": "huge"}'
SURROGATE = b'{"operator_type": 4, "token": "\\ud800"}'
DUPLICATE = b'{"operator_type": 4, "token": "a", "token": "b"}'
REPEATED = b'{"operator_type": 2, "token": "rep", "account_list": [{"account": "u"}, {"account": "v"}, ' \
           b'{"account": "u", "account_type": 0}]}'
#: the issue's lines, each followed by a valid one; line number -> (field, a word of the rule)
ISSUE_FILE = [HUGE_OP, b'{"operator_type": 4, "token": "after-huge"}', SURROGATE,
              b'{"operator_type": 4, "token": "after-surrogate"}', DUPLICATE,
              b'{"operator_type": 4, "token": "after-duplicate"}', REPEATED]
ISSUE_REFUSALS = {1: ("operator_type", "5001 digits"), 3: ("token", "valid Unicode"),
                  5: ("token", 'duplicate key "token"')}
ISSUE_STORED = {2: "after-huge", 4: "after-surrogate", 6: "after-duplicate", 7: "rep"}


def env_for(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix, "TPNS_LINGER_MS": "0",
            "TPNS_APPS": "default,ios", **extra}


def producer_for(redis_url: str, prefix: str) -> Producer:
    return Producer(redis_url, prefix, settings=Settings.from_env(env_for(redis_url, prefix)),
                    wake=lambda wakes: None)


def records(rconn: redis.Redis, prefix: str) -> set[str]:
    """Ids of the intent records under ``prefix``."""
    head = f"{prefix}i:"
    return {k[len(head):] for k in rconn.scan_iter(match=f"{head}*", count=1000)}


def run_enqueue(redis_url: str, prefix: str, data: bytes, tmp_path: Path | None = None
                ) -> subprocess.CompletedProcess[bytes]:
    """``tpns-batcher enqueue`` as a real process: from a file when ``tmp_path`` is given, else stdin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPNS_", "REDIS_URL", "CELERY_"))}
    # wakes go to the broker on the test's Redis, under the test's prefix (deleted afterwards)
    env.update(env_for(redis_url, prefix))
    if tmp_path is not None:
        path = tmp_path / f"in-{uuid.uuid4().hex[:8]}.jsonl"
        path.write_bytes(data)
        return subprocess.run([COMMAND, "enqueue", str(path)], env=env, capture_output=True, timeout=120,
                              check=False)
    return subprocess.run([COMMAND, "enqueue", "-"], input=data, env=env, capture_output=True, timeout=120,
                          check=False)


def refusals(stderr: bytes) -> dict[int, str]:
    """``line N: reason`` lines of the CLI's stderr, by N."""
    out: dict[int, str] = {}
    for text in stderr.decode("utf-8").splitlines():
        assert text.startswith("line "), f"not a refusal: {text!r}"
        number, reason = text[5:].split(": ", 1)
        assert int(number) not in out, f"line {number} refused twice"
        out[int(number)] = reason
    return out


# -- the issue's cases at each door -------------------------------------------------------------

def test_python_door_refuses_the_issues_cases_with_intent_error_only(redis_url: str, prefix: str,
                                                                     rconn: redis.Redis) -> None:
    with producer_for(redis_url, prefix) as producer:
        with pytest.raises(IntentError) as huge:
            producer.submit({"operator_type": 4 * 10**5001, "token": "huge"})
        assert huge.value.field == "operator_type"
        with pytest.raises(IntentError) as surrogate:
            producer.submit({"operator_type": 4, "token": "\ud800"})
        assert (surrogate.value.field, surrogate.value.rule) == (
            "token", "must be valid Unicode (it holds a lone surrogate)")
        # a Python dict cannot repeat a key: the duplicate-key case exists at the JSON doors only
        ids = producer.submit_many([{"operator_type": 4, "token": 1.0}, {"operator_type": 4, "token": "after"},
                                    json.loads(REPEATED)])
        assert ids[0] is None and ids[1] is not None and ids[2] is not None
        status = producer.status(ids[2])
        assert status is not None
        assert status.account_list == [{"account": "u", "account_type": 0}, {"account": "v", "account_type": 0}]
        assert records(rconn, prefix) == {ids[1], ids[2]}


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_cli_door_refuses_the_issues_cases_and_enqueues_the_lines_after_them(
        redis_url: str, prefix: str, rconn: redis.Redis, tmp_path: Path, source: str) -> None:
    data = b"\xef\xbb\xbf" + b"\r\n".join(ISSUE_FILE) + b"\r\n"
    done = run_enqueue(redis_url, prefix, data, tmp_path if source == "file" else None)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr
    refused = refusals(done.stderr)
    assert set(refused) == set(ISSUE_REFUSALS)
    for number, (field, word) in ISSUE_REFUSALS.items():
        assert refused[number].startswith(f"{field}: ") and word in refused[number], refused[number]
    ids = done.stdout.decode().split()
    assert len(ids) == len(ISSUE_STORED)
    with producer_for(redis_url, prefix) as producer:
        statuses = producer.statuses(ids)
    assert [s.token for s in statuses if s] == list(ISSUE_STORED.values())
    assert statuses[-1] is not None and statuses[-1].account_list == [
        {"account": "u", "account_type": 0}, {"account": "v", "account_type": 0}]
    assert records(rconn, prefix) == set(ids)


@pytest.fixture
def server(redis_url: str, prefix: str) -> Iterator[tuple[httpx.Client, Producer]]:
    settings = Settings.from_env(env_for(redis_url, prefix))
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
            serving(create_app(producer, settings)) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client, producer


@pytest.mark.parametrize("kind", ["application/x-ndjson", "application/json"])
def test_http_door_refuses_the_issues_cases_and_enqueues_the_rest(
        server: tuple[httpx.Client, Producer], rconn: redis.Redis, prefix: str, kind: str) -> None:
    client, producer = server
    body = (b"\xef\xbb\xbf" + b"\r\n".join(ISSUE_FILE) if kind != "application/json"
            else b"[" + b",".join(ISSUE_FILE) + b"]")
    r = client.post("/v1/intents", content=body, headers={"Content-Type": kind})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["refused"] == len(ISSUE_REFUSALS) and out["accepted"] == len(ISSUE_STORED)
    for err in out["errors"]:
        field, word = ISSUE_REFUSALS[err["index"] + 1]
        assert err["field"] == field and word in err["reason"]
        assert err["line"] == (err["index"] + 1 if kind != "application/json" else None)
    stored = [i for i in out["ids"] if i is not None]
    statuses = producer.statuses(stored)
    assert [s.token for s in statuses if s] == list(ISSUE_STORED.values())
    assert records(rconn, prefix) == set(stored)
    # each case alone, as a whole JSON body: the item is refused, never a 500
    for line in (HUGE_OP, SURROGATE, DUPLICATE):
        alone = client.post("/v1/intents", content=line, headers={"Content-Type": "application/json"})
        assert alone.status_code == 200 and alone.json()["refused"] == 1


def test_a_repeated_id_is_stored_once_and_another_payload_under_it_refused(
        redis_url: str, prefix: str, rconn: redis.Redis) -> None:
    lines = [b'{"operator_type": 4, "token": "a", "id": "x1"}', b'{"operator_type": 4, "token": "b", "id": "x1"}',
             b'{"id": "x1", "token": "a", "operator_type": 4}', b'{"operator_type": 4, "token": "c"}']
    done = run_enqueue(redis_url, prefix, b"\n".join(lines))
    assert done.returncode == 1
    assert list(refusals(done.stderr)) == [2] and "different payload" in refusals(done.stderr)[2]
    ids = done.stdout.decode().split()
    assert ids[:2] == ["x1", "x1"] and len(ids) == 3
    assert records(rconn, prefix) == {"x1", ids[2]}
    with producer_for(redis_url, prefix) as producer:
        with pytest.raises(IdConflictError):
            producer.submit({"operator_type": 4, "token": "z", "id": "x1"})
        assert producer.stats()["states"]["queued"] == 2


# -- fuzz ----------------------------------------------------------------------------------------

def _non_blank(lines: list[Line]) -> list[int]:
    numbers = []
    for number, line in enumerate(lines, start=1):
        raw = line.raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else line.raw
        if raw.strip(b" \t\r\n"):
            numbers.append(number)
    return numbers


def check_answers(lines: list[Line], refused: dict[int, Any], accepted: dict[int, str],
                  producer: Producer, stored: set[str], queued_before: int = 0) -> None:
    """The properties every door must have, given its answer per physical line; ``stored`` are
    the records the input made."""
    non_blank = _non_blank(lines)
    assert sorted([*refused, *accepted]) == non_blank, "a line got no answer, or two"
    for number in non_blank:
        line = lines[number - 1]
        if line.expect == "valid":
            assert number in accepted, f"valid line {number} refused: {refused.get(number)}: {line.raw!r}"
        elif line.expect == "refused":
            assert number in refused, f"line {number} ({line.mutation}) accepted: {line.raw!r}"
    assert set(accepted.values()) == stored, "stored records are not exactly the accepted lines"
    statuses = dict(zip(accepted.values(), producer.statuses(list(accepted.values())), strict=True))
    first: dict[str, int] = {}
    for number, intent_id in accepted.items():
        first.setdefault(intent_id, number)
    for intent_id, number in first.items():
        status, line = statuses[intent_id], lines[number - 1]
        assert status is not None
        if line.intent is None:
            continue
        assert status.operator_type == line.intent["operator_type"]
        if line.intent["operator_type"] == 5:
            assert status.account_list == collapsed([{k: v for k, v in line.intent.items()
                                                      if k in ("account", "account_type")}])
        else:
            assert status.token == line.intent["token"]
            assert status.account_list == collapsed(line.intent.get("account_list", []))
    assert producer.stats()["states"]["queued"] - queued_before == len(stored), "a line was stored twice"


ids_strategy = st.lists(st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"])), max_size=4)


@given(lines=mixed_lines(30), ids=ids_strategy, bom=st.booleans(), from_file=st.booleans())
@settings(max_examples=examples(6, 150), suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.timeout(examples(180, 1800))
def test_fuzzed_files_through_the_real_cli(redis_url: str, prefix: str, rconn: redis.Redis, tmp_path: Path,
                                           lines: list[Line], ids: list[str | None], bom: bool,
                                           from_file: bool) -> None:
    run = f"{prefix}{uuid.uuid4().hex[:8]}:"  # every example on its own keys, under the test's prefix
    scope = uuid.uuid4().hex[:6]
    lines = with_ids(lines, [None if i is None else f"{scope}-{i}" for i in ids])
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(line.raw for line in lines)
    done = run_enqueue(redis_url, run, data, tmp_path if from_file else None)
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    refused = refusals(done.stderr)
    assert done.returncode == (1 if refused else 0), done.stderr
    answered = [n for n in _non_blank(lines) if n not in refused]
    ids_out = done.stdout.decode().split()
    assert len(ids_out) == len(answered), "not one id per accepted line"
    with producer_for(redis_url, run) as producer:
        check_answers(lines, refused, dict(zip(answered, ids_out, strict=True)), producer, records(rconn, run))


@given(lines=mixed_lines(25), ids=ids_strategy, bom=st.booleans(), crlf=st.booleans())
@settings(max_examples=examples(60, 1000), suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.timeout(examples(180, 1800))
def test_fuzzed_json_lines_bodies_through_the_real_server(server: tuple[httpx.Client, Producer], prefix: str,
                                                          rconn: redis.Redis, lines: list[Line],
                                                          ids: list[str | None], bom: bool, crlf: bool) -> None:
    client, producer = server
    scope = uuid.uuid4().hex[:6]  # ids of this example only
    lines = with_ids(lines, [None if i is None else f"{scope}-{i}" for i in ids])
    body = (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(line.raw for line in lines)
    before, queued_before = records(rconn, prefix), producer.stats()["states"]["queued"]
    r = client.post("/v1/intents", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code < 500, r.text
    numbers = _non_blank(lines)
    if not numbers:
        assert r.status_code == 400
        return
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["ids"]) == len(numbers)
    refused = {numbers[e["index"]]: e["reason"] for e in out["errors"]}
    assert all(e["line"] == numbers[e["index"]] for e in out["errors"])
    accepted = {numbers[k]: i for k, i in enumerate(out["ids"]) if i is not None}
    assert (out["accepted"], out["refused"]) == (len(accepted), len(refused))
    check_answers(lines, refused, accepted, producer, records(rconn, prefix) - before, queued_before)


#: mutations that leave the item valid JSON text, so that an array of them is one JSON document
_IN_AN_ARRAY = {"op as string", "huge int", "float", "non-finite", "lone surrogate", "NUL escape",
                "duplicate key", "extra field", "wrong type"}


@given(items=st.lists(st.one_of(valid_lines(), near_valid_lines().filter(lambda line: line.mutation in _IN_AN_ARRAY),
                                json_values.map(lambda v: Line(json.dumps(v).encode(), "any"))),
                      min_size=1, max_size=15))
@settings(max_examples=examples(10, 300), suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.timeout(examples(180, 1800))
def test_fuzzed_json_arrays_through_the_real_server(server: tuple[httpx.Client, Producer],
                                                    items: list[Line]) -> None:
    client, producer = server
    body = b"[" + b",".join(item.raw for item in items) + b"]"
    r = client.post("/v1/intents", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code != 200:  # only an item nested deeper than the format needs refuses it whole
        assert r.status_code == 400 and "nested deeper" in r.text, r.text
        return
    out = r.json()
    answered = {e["index"] for e in out["errors"]} | {k for k, i in enumerate(out["ids"]) if i is not None}
    assert answered == set(range(len(items))) and len(out["errors"]) == out["refused"]
    for k, item in enumerate(items):
        if item.expect == "valid":
            assert out["ids"][k] is not None, out["errors"]
        elif item.expect == "refused":
            assert out["ids"][k] is None
    for intent_id in out["ids"]:
        assert intent_id is None or producer.status(intent_id) is not None
