"""``AsyncProducer`` against a real Redis: every method, the same errors as ``Producer``, and the
group commit of many concurrent tasks (issue 13). Each test runs its own event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.redis_faults import ReplyLosingRelay, private_redis
from worker import AsyncProducer
from worker.errors import IdConflictError, IntentError, QueueFullError, StoreUnavailableError
from worker.events import Event
from worker.producer import Producer
from worker.settings import Settings
from worker.store import Store
from worker.tools.memory import complete_all


def make(url: str, prefix: str, wakes: list[Any] | None = None, **env: str) -> AsyncProducer:
    settings = Settings.from_env({"REDIS_URL": url, "TPNS_REDIS_PREFIX": prefix, **env})
    sink = wakes if wakes is not None else []
    return AsyncProducer(url, prefix, settings=settings, wake=sink.extend)


def op4(k: int, **extra: Any) -> dict[str, Any]:
    return {"operator_type": 4, "token": f"ap-{k}", **extra}


def records(client: redis.Redis, prefix: str) -> set[str]:
    head = f"{prefix}i:"
    return {k[len(head):] for k in client.scan_iter(match=f"{head}*", count=1000)}


def test_every_method_against_a_real_redis(redis_url: str, prefix: str, rconn: redis.Redis) -> None:
    wakes: list[Any] = []

    async def scenario() -> None:
        async with make(redis_url, prefix, wakes, TPNS_LINGER_MS="0") as producer:
            one = await producer.submit({"operator_type": 2, "token": "t1",
                                         "account_list": [{"account": "u1"}]})
            ids = await producer.submit_many([op4(1), {"operator_type": 9}, op4(2, id="given")])
            assert ids[1] is None and ids[2] == "given"
            result = await producer.enqueue([op4(3), {"operator_type": 4}], line_numbers=[7, 8])
            assert result.ids[1] is None and result.errors[1].line == 8
            assert result.errors[1].field == "token"
            with pytest.raises(IntentError):
                await producer.submit_many([op4(4), {"operator_type": 4}], strict=True)
            st = await producer.status(one)
            assert st is not None and st.state == "queued" and st.token == "t1"
            assert await producer.status("nope") is None
            assert [s.id for s in await producer.statuses([ids[0], "nope"]) if s] == [ids[0]]
            with pytest.raises(TimeoutError):
                await producer.wait([one], timeout_s=0.05, poll_s=0.01)
            assert await producer.wait(["nope"]) == [None]
            assert await producer.requeue_failed() == []
            with pytest.raises(IdConflictError):
                await producer.submit(op4(99, id="given"))

    asyncio.run(scenario())
    assert len(records(rconn, prefix)) == 4  # the strict call stored nothing
    assert {(w.app, w.operator_type) for w in wakes} == {("default", 2), ("default", 4)}


def test_requeue_failed_puts_failed_intents_back(redis_url: str, prefix: str,
                                                 rconn: redis.Redis) -> None:
    sync = Producer(redis_url, prefix, settings=Settings.from_env(
        {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix, "TPNS_LINGER_MS": "0"}),
        wake=lambda w: None)
    try:
        ids = sync.submit_many([op4(1), op4(2)])
        claim = sync.store.claim("default", 4)
        assert claim.kind == "batch" and len(claim.items) == 2
        sync.store.complete(claim.batch_id or "", [
            {"id": ids[0], "state": "failed", "error": "exhausted"},
            {"id": ids[1], "state": "failed", "error": "invalid_token"}], calls=1, items_sent=2)
    finally:
        sync.close()

    async def scenario() -> list[str]:
        async with make(redis_url, prefix) as producer:
            requeued = await producer.requeue_failed("exhausted")
            st = await producer.status(ids[0])  # type: ignore[arg-type]
            assert st is not None and st.state == "queued"
            return requeued

    assert asyncio.run(scenario()) == [ids[0]]


def test_concurrent_tasks_share_commits_and_each_gets_its_own_answer(
        redis_url: str, prefix: str, rconn: redis.Redis) -> None:
    n = 256

    async def scenario() -> tuple[list[Any], int]:
        async with make(redis_url, prefix) as producer:
            await producer.apps()  # known apps read: every task is runnable at once
            intents: list[Any] = [op4(k) for k in range(n)]
            intents[100] = {"operator_type": 4, "token": "has space"}
            answers = await asyncio.gather(*(producer.submit(i) for i in intents),
                                           return_exceptions=True)
            return answers, producer.group.commits

    answers, commits = asyncio.run(scenario())
    bad = answers.pop(100)
    assert isinstance(bad, IntentError) and bad.field == "token"
    assert all(isinstance(a, str) for a in answers) and len(set(answers)) == n - 1
    assert records(rconn, prefix) == set(answers)
    # the tasks were all runnable together: one commit of at most 500 carried them
    assert commits == 1
    assert rconn.hget(f"{prefix}n", "enqueued:4") == str(n - 1)


def test_queue_full_is_told_to_each_task_refused(redis_url: str, prefix: str,
                                                 rconn: redis.Redis) -> None:
    async def scenario() -> list[Any]:
        async with make(redis_url, prefix, TPNS_MAX_PENDING="5") as producer:
            await producer.apps()
            return await asyncio.gather(*(producer.submit(op4(k)) for k in range(8)),
                                        return_exceptions=True)

    answers = asyncio.run(scenario())
    stored = [a for a in answers if isinstance(a, str)]
    full = [a for a in answers if isinstance(a, QueueFullError)]
    assert len(stored) == 5 and len(full) == 3, answers
    assert all(len(e.refused) == 1 and e.stored == [] and e.retry_after_s > 0 for e in full)
    assert records(rconn, prefix) == set(stored)


def test_a_killed_redis_gives_each_task_its_own_error(tmp_path: Path) -> None:
    with private_redis(tmp_path / "redis", password="pw-not-shown") as server:
        async def scenario() -> list[Any]:
            async with make(server.url, "tpnstest:ap-kill:") as producer:
                first = await producer.submit(op4(0))
                server.kill()
                answers: list[Any] = await asyncio.gather(
                    *(producer.submit(op4(k)) for k in range(1, 6)), return_exceptions=True)
                with pytest.raises(StoreUnavailableError):
                    await producer.status(first)
                with pytest.raises(StoreUnavailableError) as many:
                    await producer.submit_many([op4(7, id="given-7"), {"operator_type": 9}])
                assert many.value.refused == ["given-7"]
                assert many.value.result.errors[1].field == "operator_type"  # type: ignore[attr-defined]
                return answers

        answers = asyncio.run(scenario())
    assert all(type(a) is StoreUnavailableError for a in answers), answers
    # each names its own id, once: not stored, or in doubt when the call went out on a pooled
    # connection whose death the loop had not yet seen (sent, no reply: honestly unknown)
    own = [a.refused + a.in_doubt for a in answers]
    assert all(len(ids) == 1 for ids in own) and len({ids[0] for ids in own}) == 5
    assert all(not a.stored for a in answers)
    assert all("pw-not-shown" not in str(a) and "***" in str(a) for a in answers)


def test_the_sync_wait_times_out_with_timeout_error(redis_url: str, prefix: str) -> None:
    """Not a store outage: ``TimeoutError`` is an ``OSError``, which the guard used to take for one."""
    producer = Producer(redis_url, prefix, settings=Settings.from_env(
        {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix}), wake=lambda w: None)
    try:
        one = producer.submit(op4(1))
        with pytest.raises(TimeoutError) as caught:
            producer.wait([one], timeout_s=0.05, poll_s=0.01)
        assert not isinstance(caught.value, StoreUnavailableError)
    finally:
        producer.close()


def test_history_and_events_as_coroutines(redis_url: str, prefix: str) -> None:
    sync = Producer(redis_url, prefix, settings=Settings.from_env(
        {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix, "TPNS_LINGER_MS": "0"}),
        wake=lambda w: None)
    try:
        ids = sync.submit_many([op4(1), op4(1), op4(2)])
        claim = sync.store.claim("default", 4)  # the second ap-1 waits for the first
        sync.store.complete(claim.batch_id or "", [
            {"id": i.id, "state": "failed" if i.id == ids[2] else "succeeded"}
            for i in claim.items], calls=1, items_sent=len(claim.items))
        expected = [(e.stream_id, e.id, e.state) for e in sync.events() if isinstance(e, Event)]
    finally:
        sync.close()

    async def scenario() -> None:
        async with make(redis_url, prefix) as producer:
            assert [s.id for s in await producer.history("ap-1")] == [ids[1], ids[0]]
            assert await producer.history("nobody") == []
            with pytest.raises(IntentError):
                await producer.history()
            got = [(e.stream_id, e.id, e.state) async for e in producer.events()
                   if isinstance(e, Event)]
            assert got == expected and len(got) == 2
            failed = [e.id async for e in producer.events(state="failed") if isinstance(e, Event)]
            assert failed == [ids[2]]
            assert [e async for e in producer.events(got[-1][0])] == []
            with pytest.raises(IntentError):
                producer.events("nonsense")

    asyncio.run(scenario())


def test_a_lost_reply_is_in_doubt_and_each_intent_stored_once(tmp_path: Path) -> None:
    """The relay loses the reply of every script call after Redis ran it; the re-sent calls run
    again, idempotent by id: in doubt for the caller, stored once in Redis."""
    prefix = "tpnstest:ap-doubt:"
    with private_redis(tmp_path / "redis") as server, ReplyLosingRelay(server.port) as relay:
        async def scenario() -> tuple[str, StoreUnavailableError, list[Any]]:
            async with make(relay.url, prefix) as producer:
                relay.losing = False
                first = await producer.submit(op4(0))  # Redis has the script now
                relay.losing = True
                with pytest.raises(StoreUnavailableError) as many:
                    await producer.submit_many([op4(k) for k in range(1, 4)])
                singles = await asyncio.gather(*(producer.submit(op4(k)) for k in range(4, 6)),
                                               return_exceptions=True)
                return first, many.value, singles

        first, exc, singles = asyncio.run(scenario())
        stored = records(server.client(), prefix)
        counters = server.client().hgetall(f"{prefix}n")
    assert relay.calls_lost >= 2, "the call was not re-sent"
    assert exc.stored == [] and exc.refused == [] and len(exc.in_doubt) == 3
    assert all(isinstance(e, StoreUnavailableError) and len(e.in_doubt) == 1 for e in singles)
    doubts = {*exc.in_doubt, *(e.in_doubt[0] for e in singles)}  # type: ignore[union-attr]
    assert stored == {first, *doubts}
    assert counters["enqueued:4"] == "6"  # each once, however often its call ran


def test_an_intent_compacted_before_its_lost_reply_is_resent_is_not_stored_twice(
        tmp_path: Path) -> None:
    """``Producer``'s test of the same name, through ``AsyncProducer``'s own round trip."""
    prefix = "tpnstest:aresend:"
    with private_redis(tmp_path / "redis") as server, ReplyLosingRelay(server.port) as relay:
        store = Store(server.client(), prefix, linger_ms=0, status_detail_s=0)
        completed: list[int] = []

        def succeed_meanwhile() -> None:
            relay.losing = False  # the re-send goes through
            completed.append(complete_all(store, 4))

        async def scenario() -> str:
            async with make(relay.url, prefix, TPNS_STATUS_DETAIL_S="0",
                            TPNS_LINGER_MS="0") as producer:
                relay.losing = False
                await producer.submit({"operator_type": 5, "account": "warm"})  # script loaded
                relay.losing = True
                relay.on_lost = succeed_meanwhile
                return await producer.submit(op4(1))

        stored = asyncio.run(scenario())
        client = server.client()
        assert relay.calls_lost == 1 and completed == [1]
        assert client.get(f"{prefix}i:{stored}") is None, "stored again by the re-send"
        counters = client.hgetall(f"{prefix}n")
        assert counters["enqueued:4"] == "1" and counters.get("queued:4", "0") == "0", counters
        status = store.status(stored)
        assert status is not None and status.state == "succeeded" and status.detail == "compacted"
