"""End to end (issue 14): a real worker drains intents sharing a token and an account through the
sandbox, with a fault that makes them retry and invalid- tokens that fail; then the history by key
and the events stream are read the three ways a user reads them: Python, the CLI (a real process)
and HTTP (a real socket, SSE with Last-Event-ID); and a worker with a tiny TPNS_EVENTS_MAXLEN trims
the stream under a reader, who is told of the gap."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.live_server import serving
from tests.support.polling import wait_until
from worker.events import Event, Gap
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.serve.app import create_app

from .conftest import _PRODUCT_VARS, WORKER_COMMAND, MakeProducer, StartWorker, product_env

pytestmark = pytest.mark.e2e

#: enqueue order; the shared token and account chain them (per-key order)
INTENTS: list[dict[str, Any]] = [
    {"operator_type": 2, "token": "tok-shared", "account_list": [{"account": "alice"}]},
    {"operator_type": 2, "token": "invalid-1", "account_list": [{"account": "alice"}]},
    {"operator_type": 3, "token": "tok-shared", "account_list": [{"account": "alice"}]},
    {"operator_type": 4, "token": "tok-shared"},
    {"operator_type": 2, "token": "tok-other", "account_list": [{"account": "bob", "account_type": 7}]},
]


def cli(redis_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PRODUCT_VARS)}
    env.update(product_env(redis_url, prefix))
    return subprocess.run([WORKER_COMMAND, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def sse_messages(text: str) -> list[dict[str, str]]:
    """Parse a text/event-stream body into its messages (comment lines dropped)."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if fields:
            out.append(fields)
    return out


@pytest.fixture
def drained(sandbox: SandboxServer, start_worker: StartWorker,
            make_producer: MakeProducer) -> Iterator[tuple[Producer, list[str]]]:
    """The intents above, drained by a worker: every call fails with HTTP 503 until the first of
    each chain has been retrying, then the sandbox answers normally."""
    sandbox.configure(fault_rate=1.0, faults=["http_503"])
    producer = make_producer()
    ids = producer.submit_many(INTENTS, strict=True)
    assert all(ids)
    start_worker(sandbox, TPNS_HTTP_TIMEOUT_S="0.75")
    first = {ids[0], ids[4]}  # eligible at once: the others wait for ids[0] (per-key order)
    wait_until(lambda: {e.id for e in producer.events() if isinstance(e, Event)
                        and e.state == "retrying"} >= first, 60,
               message="the first intent of each chain retrying")
    sandbox.configure(fault_rate=0.0)
    producer.wait([i for i in ids if i], timeout_s=90)
    yield producer, [i for i in ids if i]


def test_history_and_events_after_a_real_worker_drained(
        drained: tuple[Producer, list[str]], redis_url: str, prefix: str) -> None:
    producer, ids = drained
    # Python: newest first, with their statuses
    by_token = producer.history("tok-shared")
    assert [s.id for s in by_token] == [ids[3], ids[2], ids[0]]
    assert [s.state for s in by_token] == ["succeeded"] * 3
    by_account = producer.history(account="alice")
    assert [(s.id, s.state) for s in by_account] == [
        (ids[2], "succeeded"), (ids[1], "failed"), (ids[0], "succeeded")]
    assert producer.history(account="alice", account_type=7) == []
    assert [s.id for s in producer.history(account="bob", account_type=7)] == [ids[4]]

    # events: the first of each chain retried (the fault), then each intent ended
    events = list(producer.events())
    assert all(isinstance(e, Event) for e in events)
    per_intent: dict[str, list[str]] = {}
    for e in events:
        assert isinstance(e, Event)
        per_intent.setdefault(e.id, []).append(e.state)
    for k in (0, 4):
        assert per_intent[ids[k]][0] == "retrying", per_intent
    for k, end in enumerate(["succeeded", "failed", "succeeded", "succeeded", "succeeded"]):
        states = per_intent[ids[k]]
        assert states[-1] == end and set(states[:-1]) <= {"retrying"}, (k, states)
    ends = [e.id for e in events if isinstance(e, Event) and e.state != "retrying"]
    # per-key order shows in the stream: the chain on tok-shared/alice ends in enqueue order
    assert [i for i in ends if i in ids[:4]] == ids[:4]
    failed = [e for e in events if isinstance(e, Event) and e.state == "failed"]
    assert [(e.id, e.error, e.result_code) for e in failed] == [(ids[1], "invalid_token", "1008006")]

    # the CLI: JSON lines, exit 1 when nothing is found
    found = cli(redis_url, prefix, "history", "--account", "alice", "--limit", "2")
    assert found.returncode == 0, found.stderr
    assert [json.loads(line)["id"] for line in found.stdout.splitlines()] == [ids[2], ids[1]]
    none = cli(redis_url, prefix, "history", "--token", "nobody")
    assert none.returncode == 1 and none.stdout == ""
    bad = cli(redis_url, prefix, "history", "--token", "t", "--account", "a")
    assert bad.returncode == 1 and "token" in bad.stderr
    tail = cli(redis_url, prefix, "events", "--from", events[1].stream_id, "--state", "failed")
    assert tail.returncode == 0, tail.stderr
    assert [(d["id"], d["state"], d["stream_id"]) for d in map(json.loads, tail.stdout.splitlines())] \
        == [(failed[0].id, "failed", failed[0].stream_id)]

    # HTTP
    app = create_app(producer, producer.settings)
    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.get("/v1/intents", params={"token": "tok-shared", "limit": 2})
        assert r.status_code == 200
        assert [s["id"] for s in r.json()["intents"]] == [ids[3], ids[2]]
        r = http.get("/v1/intents", params={"account": "bob", "account_type": 7, "app": "default"})
        assert [s["id"] for s in r.json()["intents"]] == [ids[4]]
        assert http.get("/v1/intents", params={"token": "nobody"}).json() == {"intents": []}
        for params in ({}, {"account_type": 1}, {"token": "t", "limit": 501},
                       {"account": "a", "account_type": "x"}):
            r = http.get("/v1/intents", params=params)
            assert r.status_code == 400 and r.json()["field"], params
        for params in ({"from": "x"}, {"state": "queued"}, {"follow": "maybe"}):
            assert http.get("/v1/events", params=params).status_code == 400, params

        # SSE: follow=false sends what is kept, then the response ends
        r = http.get("/v1/events", params={"follow": "false"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        messages = sse_messages(r.text)
        assert [m["id"] for m in messages] == [e.stream_id for e in events]
        assert [json.loads(m["data"])["state"] for m in messages] == \
            [e.state for e in events if isinstance(e, Event)]
        # resuming after the second: the rest, and Last-Event-ID wins over ?from=
        r = http.get("/v1/events", params={"follow": "false", "from": "0"},
                     headers={"Last-Event-ID": messages[1]["id"]})
        assert [m["id"] for m in sse_messages(r.text)] == [e.stream_id for e in events[2:]]
        # following: the backlog arrives without waiting for the stream to end
        with http.stream("GET", "/v1/events", params={"from": messages[-2]["id"]}) as live:
            lines = live.iter_lines()
            first = next(line for line in lines if line.startswith("id: "))
            assert first == f"id: {messages[-1]['id']}"


def test_a_reader_behind_a_trimmed_stream_is_told_of_the_gap(
        sandbox: SandboxServer, start_worker: StartWorker, make_producer: MakeProducer,
        redis_url: str, prefix: str) -> None:
    producer = make_producer()
    ids = producer.submit_many([{"operator_type": 4, "token": f"tok-{k}"} for k in range(8)])
    start_worker(sandbox, TPNS_EVENTS_MAXLEN="3")
    producer.wait([i for i in ids if i], timeout_s=60)
    kept = list(producer.events())
    assert len(kept) == 3 and all(isinstance(e, Event) for e in kept)
    behind = f"{int(kept[0].stream_id.split('-')[0]) - 60_000}-0"  # a reader a minute behind
    items = list(producer.events(behind))
    assert isinstance(items[0], Gap) and items[0].first_id == kept[0].stream_id
    assert [e.stream_id for e in items[1:]] == [e.stream_id for e in kept]
    with serving(create_app(producer, producer.settings)) as base:
        r = httpx.get(f"{base}/v1/events", params={"follow": "false"},
                      headers={"Last-Event-ID": behind}, timeout=30)
    messages = sse_messages(r.text)
    assert messages[0]["event"] == "gap"
    assert json.loads(messages[0]["data"])["first_id"] == kept[0].stream_id
    assert [m["id"] for m in messages[1:]] == [e.stream_id for e in kept]
    out = cli(redis_url, prefix, "events", "--from", behind)
    assert json.loads(out.stdout.splitlines()[0])["event"] == "gap"
