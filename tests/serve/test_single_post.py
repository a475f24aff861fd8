"""``POST /v1/intents`` with one intent per request, many requests at once (issue 13): they share
enqueue calls through the group commit, and each request is answered with its own id or refusal.
A real server over real sockets, a real Redis."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest
import redis
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.support.live_server import serving
from tests.support.polling import wait_until
from worker.aproducer import AsyncProducer
from worker.producer import BulkResult, Producer
from worker.serve.app import create_app
from worker.serve.intake import accepted_bytes, json_bytes
from worker.settings import Settings

DEADLINE_S = 30
JSON = {"Content-Type": "application/json"}


def doors_for(redis_url: str, prefix: str) -> tuple[Producer, AsyncProducer, Settings]:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix})
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    return producer, AsyncProducer(redis_url, prefix, settings=settings, wake=lambda w: None), settings


def gate_first_commit(doors: AsyncProducer, callers: int) -> None:
    """Hold the first commit until the rest of ``callers`` queued behind it (our own seam)."""
    commit = doors.group._commit
    first = [True]

    async def gated(items: list[Any]) -> list[Any]:
        if first[0]:
            first[0] = False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S
            while len(doors.group._queue) < callers - len(items):
                assert loop.time() < deadline, "the other requests never queued"
                await asyncio.sleep(0.005)
        return await commit(items)

    doors.group._commit = gated


def records(client: redis.Redis, prefix: str) -> set[str]:
    head = f"{prefix}i:"
    return {k[len(head):] for k in client.scan_iter(match=f"{head}*", count=1000)}


async def post_all(base: str, bodies: list[Any]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base, timeout=DEADLINE_S, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/intents", json=b) for b in bodies))


def test_concurrent_single_posts_share_commits_and_each_gets_its_own_id(
        redis_url: str, prefix: str, rconn: redis.Redis) -> None:
    producer, doors, settings = doors_for(redis_url, prefix)
    n = 24
    bodies: list[Any] = [{"operator_type": 4, "token": f"post-{k}"} for k in range(n)]
    bodies[5] = {"operator_type": 4, "token": ""}  # refused alone
    with producer, serving(create_app(producer, settings, doors)) as base:
        gate_first_commit(doors, n - 1)
        answers = asyncio.run(post_all(base, bodies))
    assert [r.status_code for r in answers] == [200] * n
    refused = answers.pop(5).json()
    assert refused["ids"] == [None] and refused["errors"][0]["field"] == "token"
    ids = [r.json()["ids"][0] for r in answers]
    assert all(isinstance(i, str) for i in ids) and len(set(ids)) == n - 1
    assert records(rconn, prefix) == set(ids)  # each stored exactly once
    # the gate lets the first commit go only once every other request queued: at most two
    assert doors.group.items == n - 1 and doors.group.commits <= 2


def test_a_single_json_line_is_answered_with_its_line(redis_url: str, prefix: str) -> None:
    producer, doors, settings = doors_for(redis_url, prefix)
    with producer, serving(create_app(producer, settings, doors)) as base, \
            httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        ndjson = {"Content-Type": "application/x-ndjson"}
        ok = client.post("/v1/intents", content=b'\n{"operator_type": 4, "token": "a", "id": "x1"}\n',
                         headers=ndjson)
        assert ok.status_code == 200 and ok.json()["ids"] == ["x1"]
        clash = client.post("/v1/intents", content=b'\n\n{"operator_type": 4, "token": "b", "id": "x1"}',
                            headers=ndjson)
        assert clash.status_code == 200 and clash.json()["ids"] == [None]
        error = clash.json()["errors"][0]
        assert error["line"] == 3 and error["field"] == "id" and "different payload" in error["reason"]
    assert doors.group.items == 2  # both went through the single-intent door


# -- the door itself (worker.serve.intake): same answers as a JSONResponse, fewer layers ------------

@pytest.mark.parametrize("intent_id", ["6f1c0e9a2b4d8c7e5f30", "android.6f1c0e9a2b4d8c7e5f30",
                                       "A-z_0.9~x:y"])
def test_the_accepted_answer_is_the_bytes_json_response_would_send(intent_id: str) -> None:
    content = {"ids": [intent_id], "errors": [], "accepted": 1, "refused": 0}
    assert accepted_bytes(intent_id) == JSONResponse(content).body


def test_every_other_answer_is_encoded_as_json_response_encodes_it() -> None:
    content = {"ids": [None, "x1"], "accepted": 1, "refused": 1,
               "errors": [{"index": 0, "line": 3, "field": "token", "reason": "« é » \u2028"}]}
    assert json_bytes(content) == JSONResponse(content).body
    with pytest.raises(ValueError):
        json_bytes({"x": float("nan")})  # as JSONResponse: never a bare NaN on the wire


def test_answers_carry_the_headers_of_a_json_response(redis_url: str, prefix: str) -> None:
    producer, doors, settings = doors_for(redis_url, prefix)
    with producer, serving(create_app(producer, settings, doors)) as base, \
            httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        answers = [client.post("/v1/intents", json={"operator_type": 4, "token": "h"}),
                   client.post("/v1/intents", json={"operator_type": 4, "token": ""}),
                   client.post("/v1/intents", content=b"{", headers=JSON),
                   client.post("/v1/intents", content=b"x", headers={"Content-Type": "text/csv"})]
        head, body = raw_post(base, b"Content-Type: application/json\r\nContent-Length: " + b"9" * 19)
    assert [r.status_code for r in answers] == [200, 200, 400, 415]
    for r in answers:
        assert r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r.content)
        assert isinstance(r.json(), dict)
    assert answers[0].json()["accepted"] == 1 and answers[1].json()["refused"] == 1
    # refused on the declared length alone, before a byte of the body is read
    assert head.startswith(b"http/1.1 413 ") and b"content-type: application/json" in head
    assert b"content-length: %d" % len(body) in head and "larger than" in json.loads(body)["error"]


def raw_post(base: str, headers: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    """``POST /v1/intents`` over a socket of its own, with headers a client library would not
    send; the answer's head (names in lower case) and body."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(b"POST /v1/intents HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + headers
                     + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.lower(), rest


class Recorder:
    """Wraps an ASGI app and records, per HTTP request, the messages it sent and what it raised
    (our own seam: a client gone leaves nothing else to observe)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.done: list[tuple[list[str], BaseException | None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent: list[str] = []

        async def record(message: Message) -> None:
            sent.append(message["type"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        except BaseException as exc:
            self.done.append((sent, exc))
            raise
        self.done.append((sent, None))


def test_a_client_gone_before_its_body_ends_is_not_answered_and_nothing_is_stored(
        redis_url: str, prefix: str, rconn: redis.Redis) -> None:
    producer, doors, settings = doors_for(redis_url, prefix)
    app = Recorder(create_app(producer, settings, doors))
    with producer, serving(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
            sock.sendall(b"POST /v1/intents HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 200\r\n\r\n" + b'{"operator_type": 4, "tok')
        wait_until(lambda: app.done, DEADLINE_S, message="the request to end")
        assert app.done == [([], None)]  # no 500 attempted, nothing raised: nobody to answer
        with httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
            after = client.post("/v1/intents", json={"operator_type": 4, "token": "next"})
    assert after.status_code == 200
    assert records(rconn, prefix) == {after.json()["ids"][0]}


def test_a_post_under_a_root_path_goes_through_the_router_to_the_same_door(
        redis_url: str, prefix: str, rconn: redis.Redis) -> None:
    producer, doors, settings = doors_for(redis_url, prefix)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(producer, settings, doors), root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = await client.post("/api/v1/intents", json={"operator_type": 4, "token": "r"})
        await doors.aclose()
        return answer

    with producer:
        answer = asyncio.run(post())
    assert answer.status_code == 200 and answer.json()["accepted"] == 1
    assert records(rconn, prefix) == set(answer.json()["ids"])
    assert doors.group.items == 1  # the single-intent door, reached by the route table


class BrokenDoors(AsyncProducer):
    """An ``AsyncProducer`` whose enqueue meets a Redis error it does not turn into its own."""

    async def enqueue_one(self, intent: Any, *, line: int | None = None) -> BulkResult:
        raise redis.ConnectionError("Connection refused")


def test_a_redis_error_out_of_the_door_is_a_503_as_on_every_route(redis_url: str, prefix: str) -> None:
    producer, _, settings = doors_for(redis_url, prefix)
    doors = BrokenDoors(redis_url, prefix, settings=settings, wake=lambda w: None)
    with producer, serving(create_app(producer, settings, doors)) as base, \
            httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        r = client.post("/v1/intents", json={"operator_type": 4, "token": "b"})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["code"] == "store_unavailable" and "Connection refused" in r.json()["error"]
