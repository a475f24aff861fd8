"""``POST /v1/intents`` with one intent per request, many requests at once (issue 13): they share
enqueue calls through the group commit, and each request is answered with its own id or refusal.
A real server over real sockets, a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import redis

from tests.support.live_server import serving
from worker.aproducer import AsyncProducer
from worker.producer import Producer
from worker.serve.app import create_app
from worker.settings import Settings

DEADLINE_S = 30


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
