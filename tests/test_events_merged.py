"""worker.events_merged on a real three-master Redis Cluster: a reader that names no app reads
every app's stream (two apps on two masters) merged in time order, resumes from any cursor
without loss or repeat, reports each app's gaps, picks up apps that join, and wakes up for a new
entry of any app; through Python (sync and asyncio), the CLI and the HTTP SSE endpoint."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster

from tests.support.fuzz import examples
from tests.support.live_server import serving
from tests.support.polling import wait_until
from tests.test_cluster_store import apps_on_two_masters, login, make
from worker.aproducer import AsyncProducer
from worker.cli import main
from worker.errors import IntentError
from worker.events import Event, Gap, parse_from
from worker.events_merged import AsyncMergedEventReader, MergedEventReader, parse_start
from worker.keys import EVENTS_ADDED_SUFFIX, Keys
from worker.producer import Producer
from worker.serve.app import create_app
from worker.settings import Settings
from worker.tools.localcluster import LocalCluster

Item = tuple[str, str, str]  # (kind, app, stream id)
#: the wakes' broker a cluster store needs configured (never used: the producers' wakes go nowhere)
BROKER = "redis://127.0.0.1:9/0"


@pytest.fixture
def apps(redis_cluster: LocalCluster, cclient: RedisCluster) -> tuple[str, str]:
    return apps_on_two_masters(redis_cluster, cclient)


def put(client: RedisCluster, prefix: str, app: str, ids: Sequence[str],
        state: str = "succeeded") -> list[str]:
    """Entries as emit() writes them into ``app``'s stream, with the given ids (``*``: the
    server's); their stream ids."""
    key = Keys(prefix).tagged(app).events
    out = []
    for sid in ids:
        got = client.xadd(key, {"id": f"{app}.{sid}", "app": app, "operator_type": 2,
                                "state": state, "verified": "", "error": "", "result_code": "0",
                                "ret_code": "0", "attempts": 1, "at": 1764064800000}, id=sid)
        client.incr(key + EVENTS_ADDED_SUFFIX)  # emit() counts what it adds
        out.append(got.decode() if isinstance(got, bytes) else str(got))
    return out


def seen(items: Sequence[Event | Gap]) -> list[Item]:
    return [("gap" if isinstance(i, Gap) else "event", i.app or "", i.stream_id) for i in items]


def expected(entries: dict[str, list[str]]) -> list[Item]:
    """Every entry, in the merged order: by (ms, seq) of the stream id, then by app name."""
    def order(item: Item) -> tuple[int, int, str]:
        ms, seq = item[2].split("-")
        return int(ms), int(seq), item[1]
    return sorted((("event", app, sid) for app, ids in entries.items() for sid in ids), key=order)


def reader(client: RedisCluster, prefix: str, apps: Sequence[str], from_id: str = "0",
           **kw: Any) -> MergedEventReader:
    keys = Keys(prefix)
    return MergedEventReader(client, lambda app: keys.tagged(app).events, lambda: apps, from_id,
                             **kw)


def read_all(r: MergedEventReader) -> list[Event | Gap]:
    return list(r.follow())


@pytest.fixture
def producer(redis_cluster: LocalCluster, cluster_prefix: str) -> Iterator[Producer]:
    settings = Settings.from_env({"REDIS_URL": redis_cluster.url,
                                  "TPNS_REDIS_PREFIX": cluster_prefix,
                                  "CELERY_BROKER_URL": BROKER})
    with Producer(redis_cluster.url, cluster_prefix, settings=settings,
                  wake=lambda wakes: None) as p:
        yield p


def test_the_events_of_two_apps_on_two_masters_come_merged_in_time_order(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str],
        producer: Producer) -> None:
    one, two = apps
    store = make(cclient, cluster_prefix)
    store.register_apps([one, two])
    for round_ in range(3):  # the scripts write the entries, with the masters' own ids
        for app in (two, one):
            store.enqueue([(f"{app}.r{round_}", login(f"t{round_}", "u", app))])
            claim = store.claim(app, 2)
            assert claim.batch_id is not None
            store.complete(claim.batch_id, [{"id": f"{app}.r{round_}", "state": "succeeded"}],
                           calls=1, items_sent=1, operator_type=2)
    items = list(producer.events())
    assert all(isinstance(i, Event) for i in items)
    got = seen(items)
    by_app = {app: [sid for _, b, sid in got if b == app] for app in (one, two)}
    assert got == expected(by_app)  # in (ms, seq, app) order
    for app in (one, two):  # each app's own order, every entry once
        assert [i.id for i in items if i.app == app] == [f"{app}.r{k}" for k in range(3)]
    last = items[-1].cursor
    assert last is not None and set(parse_start(last)[1]) == {one, two, "default"}
    assert list(producer.events(last)) == []


def test_ties_go_by_app_name_and_every_cursor_resumes_without_loss_or_repeat(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str]) -> None:
    one, two = apps
    entries = {one: put(cclient, cluster_prefix, one, ["1000-0", "1002-0", "1002-1", "1005-0"]),
               two: put(cclient, cluster_prefix, two, ["1001-0", "1002-0", "1003-0", "1004-0"])}
    # two per read and per app: buffers run out and are read again in the middle of the merge
    items = read_all(reader(cclient, cluster_prefix, [one, two], count=2))
    assert seen(items) == expected(entries)
    for k, item in enumerate(items):
        assert item.cursor is not None
        rest = read_all(reader(cclient, cluster_prefix, [one, two], item.cursor, count=3))
        assert seen(rest) == seen(items[k + 1:]), f"resuming after item {k}"
        assert item.as_dict()["cursor"] == item.cursor
    # a plain stream id (or its milliseconds) is a start in every app's stream
    after = read_all(reader(cclient, cluster_prefix, [one, two], "1002"))
    assert seen(after) == [i for i in expected(entries) if i[2] > "1002-0"]


_IDS = st.lists(st.tuples(st.integers(1000, 1006), st.integers(0, 2)), max_size=6, unique=True)


@settings(max_examples=examples(30, 300), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.tuples(_IDS, _IDS), count=st.integers(1, 4), cut=st.integers(0, 12))
def test_any_two_streams_merge_in_order_and_resume_from_any_cursor(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str],
        ids: tuple[list[tuple[int, int]], list[tuple[int, int]]], count: int, cut: int) -> None:
    # one example's keys, under the test's prefix (deleted with it)
    prefix = f"{cluster_prefix}p{uuid.uuid4().hex[:8]}:"
    entries = {app: put(cclient, prefix, app, [f"{ms}-{seq}" for ms, seq in sorted(mine)])
               for app, mine in zip(apps, ids, strict=True)}
    items = read_all(reader(cclient, prefix, apps, count=count))
    assert seen(items) == expected(entries)
    if items:
        start = items[min(cut, len(items) - 1)]
        rest = read_all(reader(cclient, prefix, apps, start.cursor or "", count=count))
        assert seen(rest) == seen(items[min(cut, len(items) - 1) + 1:])


def test_entries_trimmed_before_a_resume_are_a_gap_that_names_its_app(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str]) -> None:
    one, two = apps
    put(cclient, cluster_prefix, one, ["1000-0", "1002-0", "1004-0"])
    put(cclient, cluster_prefix, two, ["999-0", "1001-0", "1003-0"])
    # lost before the reader started at 0 (everything kept): no gap, then or on a resume
    cclient.xtrim(Keys(cluster_prefix).tagged(two).events, maxlen=2, approximate=False)
    first = reader(cclient, cluster_prefix, [one, two]).read()[0]
    assert seen([first]) == [("event", one, "1000-0")]
    assert first.cursor is not None
    cclient.xtrim(Keys(cluster_prefix).tagged(one).events, maxlen=1, approximate=False)
    items = read_all(reader(cclient, cluster_prefix, [one, two], first.cursor))
    assert seen(items) == [("event", two, "1001-0"), ("event", two, "1003-0"),
                           ("gap", one, f"1003-{2**64 - 1}"), ("event", one, "1004-0")]
    gap = items[2]
    assert isinstance(gap, Gap) and (gap.from_id, gap.first_id) == ("1000-0", "1004-0")
    assert gap.as_dict()["app"] == one
    assert gap.cursor is not None  # resuming after the gap is not told of it again
    assert seen(read_all(reader(cclient, cluster_prefix, [one, two], gap.cursor))) \
        == [("event", one, "1004-0")]


def test_an_app_that_joins_is_read_from_its_beginning_or_after_the_id_started_from(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str]) -> None:
    one, two = apps
    known = [one]
    put(cclient, cluster_prefix, one, ["1000-0"])
    fresh = reader(cclient, cluster_prefix, known, "$")
    after_id = reader(cclient, cluster_prefix, known, "1000-5")
    assert fresh.read() == [] and after_id.read() == []
    put(cclient, cluster_prefix, two, ["1000-1", "1001-0"])
    put(cclient, cluster_prefix, one, ["1002-0"])
    known.append(two)  # registered by its worker after the readers started
    assert seen(fresh.read()) == [("event", two, "1000-1"), ("event", two, "1001-0"),
                                  ("event", one, "1002-0")]
    assert seen(after_id.read()) == [("event", two, "1001-0"), ("event", one, "1002-0")]


def test_a_cursor_naming_an_app_no_longer_known_still_reads_it_and_a_new_one_from_0(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str]) -> None:
    one, two = apps
    put(cclient, cluster_prefix, one, ["1000-0", "1001-0"])
    put(cclient, cluster_prefix, two, ["1000-1"])
    items = read_all(reader(cclient, cluster_prefix, [], f"{one}:1000-0"))
    assert seen(items) == [("event", one, "1001-0")]  # two is unknown here: not read
    items = read_all(reader(cclient, cluster_prefix, [two], f"{one}:1000-0"))
    assert seen(items) == [("event", two, "1000-1"), ("event", one, "1001-0")]


def test_the_state_filter_moves_the_cursor_past_what_it_skips(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str]) -> None:
    one, two = apps
    put(cclient, cluster_prefix, one, ["1000-0"], state="succeeded")
    put(cclient, cluster_prefix, one, ["1001-0"], state="failed")
    put(cclient, cluster_prefix, two, ["1000-1"], state="succeeded")
    put(cclient, cluster_prefix, two, ["1002-0"], state="failed")
    items = read_all(reader(cclient, cluster_prefix, [one, two], state="failed"))
    assert seen(items) == [("event", one, "1001-0"), ("event", two, "1002-0")]
    assert parse_start(items[0].cursor)[1] == {one: "1001-0", two: "1000-1"}


def test_a_following_reader_wakes_up_for_a_new_entry_of_any_app(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str]) -> None:
    one, two = apps
    put(cclient, cluster_prefix, one, ["1000-0"])
    follower = reader(cclient, cluster_prefix, [one, two], "$")
    try:
        assert follower.read() == [] and follower.caught_up
        for app in (two, one):
            added: list[str] = []

            def add(app: str = app, added: list[str] = added) -> None:
                # once the reader is blocked on every app's stream
                wait_until(lambda: len(follower._waiting) == 2, 30, message="reader waiting")
                added.extend(put(cclient, cluster_prefix, app, ["*"]))

            thread = threading.Thread(target=add)
            thread.start()
            got = follower.read(block_ms=30_000)
            thread.join()
            assert seen(got) == [("event", app, added[0])]
    finally:
        follower.close()
    # the other app's read was still blocked: closing ends it, and no thread outlives the reader
    assert [t.name for t in threading.enumerate() if t.name.startswith("tpns-events")] == []


def test_bad_starts_are_refused_with_the_field_and_the_rule(
        cclient: RedisCluster, cluster_prefix: str, apps: tuple[str, str],
        producer: Producer) -> None:
    one, _ = apps
    for bad in ("nonsense", f"{one}:1-0,{one}:2-0", f"{one}:1-0,", "Upper:1-0", f"{one}:x"):
        with pytest.raises(IntentError, match="cursor of every app") as caught:
            producer.events(bad)
        assert caught.value.field == "from"
    assert parse_start("$") == ("$", {}) and parse_start("17") == ("17-0", {})
    with pytest.raises(IntentError):  # one stream takes no cursor of several apps
        parse_from(f"{one}:1-0")


def test_the_async_producer_reads_the_apps_merged_resumes_and_wakes_up(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str,
        apps: tuple[str, str]) -> None:
    one, two = apps
    entries = {one: put(cclient, cluster_prefix, one, ["1000-0", "1003-0"]),
               two: put(cclient, cluster_prefix, two, ["1001-0", "1002-0"])}
    make(cclient, cluster_prefix).register_apps([one, two])
    settings = Settings.from_env({"REDIS_URL": redis_cluster.url,
                                  "TPNS_REDIS_PREFIX": cluster_prefix,
                                  "CELERY_BROKER_URL": BROKER})

    async def until_waiting(follower: AsyncMergedEventReader) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while len(follower._waiting) < 3:  # one blocking read per app (default, one, two)
            assert asyncio.get_running_loop().time() < deadline, "reader not waiting"
            await asyncio.sleep(0.01)

    async def run() -> tuple[list[Event | Gap], list[Event | Gap], list[Event | Gap]]:
        producer = AsyncProducer(redis_cluster.url, cluster_prefix, settings=settings,
                                 wake=lambda wakes: None)
        try:
            items = [i async for i in producer.events()]
            rest = [i async for i in producer.events(items[1].cursor or "")]
            keys = Keys(cluster_prefix)
            follower = AsyncMergedEventReader(producer.redis, lambda a: keys.tagged(a).events,
                                              producer.apps, items[-1].cursor or "")
            try:
                assert await follower.read() == []
                waking = asyncio.ensure_future(follower.read(block_ms=30_000))
                await until_waiting(follower)
                put(cclient, cluster_prefix, two, ["1004-0"])
                return items, rest, await waking
            finally:
                await follower.close()
        finally:
            await producer.aclose()

    items, rest, new = asyncio.run(run())
    assert seen(items) == expected(entries)
    assert seen(rest) == expected(entries)[2:]
    assert seen(new) == [("event", two, "1004-0")]


def test_the_cli_prints_the_merged_events_with_cursors_and_resumes_from_one(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str,
        apps: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = apps
    entries = {one: put(cclient, cluster_prefix, one, ["1000-0", "1002-0"]),
               two: put(cclient, cluster_prefix, two, ["1001-0"])}
    make(cclient, cluster_prefix).register_apps([one, two])
    monkeypatch.setenv("REDIS_URL", redis_cluster.url)
    monkeypatch.setenv("TPNS_REDIS_PREFIX", cluster_prefix)
    monkeypatch.setenv("CELERY_BROKER_URL", BROKER)
    monkeypatch.delenv("TPNS_CONFIG_FILE", raising=False)
    done = CliRunner().invoke(main, ["events"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [("event", d["app"], d["stream_id"]) for d in lines] == expected(entries)
    done = CliRunner().invoke(main, ["events", "--from", lines[0]["cursor"]],
                              catch_exceptions=False)
    assert [json.loads(line)["stream_id"] for line in done.stdout.splitlines()] \
        == ["1001-0", "1002-0"]
    done = CliRunner().invoke(main, ["events", "--app", one], catch_exceptions=False)
    assert [json.loads(line).get("cursor") for line in done.stdout.splitlines()] == [None, None]


def sse_messages(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if not line.startswith(":"))
        if fields:
            out.append(fields)
    return out


def test_the_sse_endpoint_sends_cursors_as_ids_and_resumes_after_last_event_id(
        redis_cluster: LocalCluster, cclient: RedisCluster, cluster_prefix: str,
        apps: tuple[str, str], producer: Producer) -> None:
    one, two = apps
    entries = {one: put(cclient, cluster_prefix, one, ["1000-0", "1003-0"]),
               two: put(cclient, cluster_prefix, two, ["1001-0", "1002-0"])}
    make(cclient, cluster_prefix).register_apps([one, two])
    with serving(create_app(producer, producer.settings)) as base, \
            httpx.Client(base_url=base, timeout=30) as http:
        got = http.get("/v1/events", params={"follow": "false"})
        assert got.status_code == 200
        messages = sse_messages(got.text)
        data = [json.loads(m["data"]) for m in messages]
        assert [("event", d["app"], d["stream_id"]) for d in data] == expected(entries)
        assert [m["id"] for m in messages] == [d["cursor"] for d in data]
        resumed = http.get("/v1/events", params={"follow": "false"},
                           headers={"Last-Event-ID": messages[1]["id"]})
        assert [json.loads(m["data"])["stream_id"] for m in sse_messages(resumed.text)] \
            == ["1002-0", "1003-0"]
        bad = http.get("/v1/events", params={"follow": "false"},
                       headers={"Last-Event-ID": f"{one}:1-0,{one}:2-0"})
        assert bad.status_code == 400 and bad.json()["field"] == "Last-Event-ID"
