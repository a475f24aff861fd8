"""Group commit (issue 13): concurrent ``Producer.submit`` calls share enqueue calls, and each
caller still gets its own id or its own refusal — against a real Redis (the machine's, or private
ones the tests kill).

To make "concurrent" a fact rather than luck, the tests hold the commits at a gate until every
other caller has queued behind them; the next commits then carry all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.polling import wait_until
from tests.support.redis_faults import ReplyLosingRelay, private_redis
from worker.errors import IdConflictError, IntentError, QueueFullError, StoreUnavailableError
from worker.groupcommit import GroupCommit
from worker.producer import Producer
from worker.settings import Settings

DEADLINE_S = 30


def make_producer(url: str, prefix: str, **env: str) -> Producer:
    settings = Settings.from_env({"REDIS_URL": url, "TPNS_REDIS_PREFIX": prefix, **env})
    return Producer(url, prefix, settings=settings, wake=lambda wakes: None)


def op4(k: int, **extra: Any) -> dict[str, Any]:
    return {"operator_type": 4, "token": f"gc-{k}", **extra}


def until(condition: Callable[[], bool], what: str) -> None:
    wait_until(condition, DEADLINE_S, interval_s=0.005, message=what)


def gate_commits(producer: Producer, callers: int,
                 before: Callable[[], None] = lambda: None) -> None:
    """Hold the producer's commits until every one of ``callers`` is in a held commit or queued
    behind them (at most ``group.depth`` commits are in flight, so the rest must queue), then
    run ``before`` and let them all go (the seam is our own: the commit function of the group)."""
    commit = producer.group._commit
    held = [0]
    lock = threading.Lock()
    go = threading.Event()

    def gated(items: list[Any]) -> list[Any]:
        if not go.is_set():
            with lock:
                held[0] += len(items)
            until(lambda: go.is_set() or held[0] + producer.group.queued == callers,
                  f"{callers} callers held or queued")
            with lock:
                if not go.is_set():
                    before()
                    go.set()
        return commit(items)

    producer.group._commit = gated


def submit_all(producer: Producer, intents: list[Any]) -> list[str | BaseException]:
    """Each intent submitted from its own thread, all at once; each thread's answer."""
    answers: list[str | BaseException] = [RuntimeError("no answer")] * len(intents)

    def one(k: int) -> None:
        try:
            answers[k] = producer.submit(intents[k])
        except Exception as exc:
            answers[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(intents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
        assert not t.is_alive(), "a caller never got its answer"
    return answers


def records(client: redis.Redis, prefix: str) -> set[str]:
    head = f"{prefix}i:"
    return {k[len(head):] for k in client.scan_iter(match=f"{head}*", count=1000)}


def test_concurrent_submits_each_get_their_own_id_in_a_few_script_calls(tmp_path: Path) -> None:
    """On a private Redis, so that its command statistics count our script calls alone.

    The commits are held until every other caller queued behind them: at most ``depth`` (2)
    held, and the callers queued behind them go in at most two more (a leader takes its share,
    half of the callers about, and the next one the rest)."""
    with private_redis(tmp_path / "redis") as server:
        prefix = "tpnstest:gc:"
        producer = make_producer(server.url, prefix)
        try:
            warm = producer.submit(op4(-1))  # the known apps read, the script loaded
            client = server.client()
            client.config_resetstat()
            n = 40
            gate_commits(producer, n)
            answers = submit_all(producer, [op4(k) for k in range(n)])
            stats = client.info("commandstats")
        finally:
            producer.close()
        assert all(isinstance(a, str) for a in answers), answers
        assert len(set(answers)) == n, "two callers got the same id"
        stored = records(client, prefix)
        assert stored == {warm, *answers}
        assert producer.group.depth == 2
        assert producer.group.commits <= 1 + 2 + 2 and producer.group.items == n + 1
        assert stats["cmdstat_evalsha"]["calls"] <= 4, stats  # 40 intents, at most 4 calls
        assert client.hget(f"{prefix}n", "enqueued:4") == str(n + 1)  # each stored once
        assert sorted(client.get(f"{prefix}i:{a}") is not None for a in answers) == [True] * n


def test_a_bad_intent_among_concurrent_good_ones_is_refused_alone(redis_url: str, prefix: str,
                                                                  rconn: redis.Redis) -> None:
    producer = make_producer(redis_url, prefix)
    try:
        taken = producer.submit(op4(0, id="taken"))
        good = [op4(k) for k in range(1, 11)]
        bad = {"operator_type": 4, "token": "has space"}
        clash = op4(99, id="taken")  # the id is stored with another payload
        gate_commits(producer, len(good) + 1)  # the bad one never queues; the clash does
        answers = submit_all(producer, [*good, bad, clash])
    finally:
        producer.close()
    *ids, refused, conflict = answers
    assert isinstance(refused, IntentError) and not isinstance(refused, IdConflictError)
    assert refused.field == "token" and "whitespace" in refused.rule
    assert isinstance(conflict, IdConflictError) and "taken" in str(conflict)
    assert all(isinstance(i, str) for i in ids), ids
    assert records(rconn, prefix) == {taken, *ids}  # type: ignore[arg-type]
    assert rconn.hget(f"{prefix}n", "enqueued:4") == str(1 + len(good))


def test_queue_full_is_told_to_each_caller_refused(redis_url: str, prefix: str,
                                                   rconn: redis.Redis) -> None:
    producer = make_producer(redis_url, prefix, TPNS_MAX_PENDING="5")
    try:
        gate_commits(producer, 8)
        answers = submit_all(producer, [op4(k) for k in range(8)])
    finally:
        producer.close()
    stored = [a for a in answers if isinstance(a, str)]
    full = [a for a in answers if isinstance(a, QueueFullError)]
    assert len(stored) == 5 and len(full) == 3, answers
    for exc in full:  # each refused caller hears about its own intent only
        assert exc.code == "queue_full" and "TPNS_MAX_PENDING (5)" in str(exc)
        assert exc.stored == [] and exc.in_doubt == [] and len(exc.refused) == 1
        assert exc.result.ids == [None]  # type: ignore[attr-defined]
    refused = {exc.refused[0] for exc in full}
    assert len(refused) == 3 and not refused & set(stored)
    assert records(rconn, prefix) == set(stored)


def test_redis_killed_during_a_group_commit_gives_each_caller_its_own_error(
        tmp_path: Path) -> None:
    with private_redis(tmp_path / "redis") as server:
        producer = make_producer(server.url, "tpnstest:gc-kill:")
        try:
            producer.apps()
            n = 6
            gate_commits(producer, n, before=server.kill)
            answers = submit_all(producer, [op4(k) for k in range(n)])
        finally:
            producer.close()
    assert all(type(a) is StoreUnavailableError for a in answers), answers
    refused = [a.refused for a in answers]  # type: ignore[union-attr]
    assert all(len(r) == 1 for r in refused), refused  # its own id, nobody else's
    assert len({r[0] for r in refused}) == n
    for exc in answers:
        assert exc.stored == [] and exc.in_doubt == []  # type: ignore[union-attr]
        assert f"127.0.0.1:{server.port}" in str(exc)


def test_a_lost_reply_of_a_group_commit_is_in_doubt_for_each_caller(tmp_path: Path) -> None:
    prefix = "tpnstest:gc-doubt:"
    with private_redis(tmp_path / "redis") as server, ReplyLosingRelay(server.port) as relay:
        producer = make_producer(relay.url, prefix)
        try:
            relay.losing = False
            first = producer.submit(op4(100))  # Redis has the script now
            relay.losing = True
            n = 5
            gate_commits(producer, n)
            answers = submit_all(producer, [op4(k) for k in range(n)])
        finally:
            producer.close()
        stored = records(server.client(), prefix)
    assert all(type(a) is StoreUnavailableError for a in answers), answers
    doubts = [a.in_doubt for a in answers]  # type: ignore[union-attr]
    assert all(len(d) == 1 for d in doubts) and len({d[0] for d in doubts}) == n
    assert all(a.refused == [] and a.stored == [] for a in answers)  # type: ignore[union-attr]
    # in doubt, and in fact stored (the script ran; its reply was lost): each can be looked up
    assert stored == {first, *(d[0] for d in doubts)}


# -- the mechanism on its own ------------------------------------------------------------------

def test_a_lone_caller_does_not_wait_for_the_window() -> None:
    """With an hour's window, a lone caller still commits at once: nobody else is on the way."""
    group: GroupCommit[int, int] = GroupCommit(lambda items: [i * 2 for i in items],
                                               window_s=3600)
    assert group.run(lambda: 21) == 42
    assert group.commits == 1


def test_a_leader_waits_for_a_caller_still_preparing() -> None:
    group: GroupCommit[int, int] = GroupCommit(lambda items: [i * 2 for i in items],
                                               window_s=3600)
    entered, release = threading.Event(), threading.Event()
    answers: dict[str, int] = {}

    def slow() -> int:
        entered.set()
        release.wait(DEADLINE_S)
        return 2

    slow_thread = threading.Thread(target=lambda: answers.update(slow=group.run(slow)))
    slow_thread.start()
    entered.wait(DEADLINE_S)
    lead_thread = threading.Thread(target=lambda: answers.update(fast=group.run(lambda: 1)))
    lead_thread.start()
    until(lambda: group.queued == 1, "the leader queued and waits")
    release.set()
    slow_thread.join(DEADLINE_S)
    lead_thread.join(DEADLINE_S)
    assert answers == {"fast": 2, "slow": 4}
    assert group.commits == 1 and group.items == 2  # one call for both


def test_a_failing_prepare_queues_nothing_and_a_commit_error_reaches_every_caller() -> None:
    def commit(items: list[int]) -> list[int | BaseException]:
        raise ValueError("store broke")

    group: GroupCommit[int, int] = GroupCommit(commit)
    with pytest.raises(KeyError):
        group.run(lambda: {}["x"])
    assert group.commits == 0 and group.queued == 0
    with pytest.raises(ValueError, match="store broke"):
        group.run(lambda: 1)
    with pytest.raises(ValueError):  # and the next caller leads again
        group.run(lambda: 2)
    assert group.commits == 2


def test_with_depth_two_two_commits_are_in_flight_and_a_third_waits_for_one_of_them() -> None:
    """Callers "a" and "b" each lead a commit that the commit function holds; with two in
    flight, caller "c" queues until one of them ends, then goes while the other is still held."""
    held = {"a": threading.Event(), "b": threading.Event()}
    entered: dict[str, threading.Event] = {k: threading.Event() for k in ("a", "b", "c")}

    def commit(items: list[str]) -> list[str | BaseException]:
        for item in items:
            entered[item].set()
            if item in held:
                held[item].wait(DEADLINE_S)
        return [item.upper() for item in items]

    group: GroupCommit[str, str] = GroupCommit(commit, depth=2)
    answers: dict[str, str] = {}

    def call(item: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.update({item: group.run(lambda: item)}))
        thread.start()
        return thread

    threads = {"a": call("a")}
    until(entered["a"].is_set, "a's commit in flight")
    threads["b"] = call("b")
    until(entered["b"].is_set, "b's commit in flight while a's is")
    threads["c"] = call("c")
    until(lambda: group.queued == 1, "c queued behind the two commits in flight")
    assert not entered["c"].is_set() and answers == {}
    held["b"].set()
    threads["b"].join(DEADLINE_S)
    threads["c"].join(DEADLINE_S)
    assert answers == {"b": "B", "c": "C"}  # c went once b's commit ended; a's is still held
    held["a"].set()
    threads["a"].join(DEADLINE_S)
    assert answers == {"a": "A", "b": "B", "c": "C"}
    assert group.commits == 3 and group.items == 3


def test_with_depth_one_a_second_caller_waits_for_the_commit_in_flight() -> None:
    release = threading.Event()
    entered = threading.Event()

    def commit(items: list[str]) -> list[str | BaseException]:
        entered.set()
        if "a" in items:
            release.wait(DEADLINE_S)
        return [item.upper() for item in items]

    group: GroupCommit[str, str] = GroupCommit(commit)
    answers: dict[str, str] = {}
    first = threading.Thread(target=lambda: answers.update(a=group.run(lambda: "a")))
    first.start()
    until(entered.is_set, "a's commit in flight")
    second = threading.Thread(target=lambda: answers.update(b=group.run(lambda: "b")))
    second.start()
    until(lambda: group.queued == 1, "b queued behind a's commit")
    assert answers == {}
    release.set()
    first.join(DEADLINE_S)
    second.join(DEADLINE_S)
    assert answers == {"a": "A", "b": "B"} and group.commits == 2
