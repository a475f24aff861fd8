"""The events stream (SPEC §8): every change of an intent to ``retrying``, ``verifying``,
``succeeded`` or ``failed``, appended to the Redis Stream ``<prefix>events`` by the very Lua script
that makes the change (``lib.lua``'s ``emit``), capped by ``TPNS_EVENTS_MAXLEN``.

This module is the one reader: the CLI (``tpns-batcher events``), ``GET /v1/events`` (SSE) and
``Producer.events`` all go through ``EventReader``, and so can a webhook deliverer or a live page.
On a Redis Cluster store each app has its own stream, and a reader that names no app merges one
``EventReader`` per app (``worker.events_merged``).

A reader keeps a cursor (the last stream id it handed out) and never skips silently: when its
cursor is older than the id just before the first entry still kept, entries after it may have been
trimmed before it read them, and the next read starts with a ``Gap`` that names the first id kept.
Redis keeps no record of which ids were trimmed, so a cursor that was itself the last entry of a
trimmed node is reported too (a gap too many, never one too few); Redis 7's ``entries-added``
rules out streams that never lost anything. The check and the read run in one ``MULTI`` so a trim
cannot slip between them.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio

from .errors import IntentError
from .keys import EVENTS_ADDED_SUFFIX
from .store import iso_ms

#: the states that make an event (the others, queued and sending, are not news to a subscriber)
EVENT_STATES = ("retrying", "verifying", "succeeded", "failed")
#: the fields of an entry, in the order emit() writes them (same fields, same order: Redis stores
#: the names once per stream node)
FIELDS = ("id", "app", "operator_type", "state", "verified", "error", "result_code", "ret_code",
          "attempts", "at")
#: entries per read; a follower reads as many per round trip
READ_COUNT = 500
#: how long one blocking read waits for a new entry before a follower checks on its caller
BLOCK_MS = 1000
_STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")


@dataclass(frozen=True)
class Event:
    """One state change of one intent."""

    stream_id: str
    id: str
    app: str
    operator_type: int
    state: str
    #: True/False with verification on (SPEC §6.1), None when it is off
    verified: bool | None
    error: str | None
    result_code: str | None
    ret_code: int | None
    attempts: int
    #: when the change happened (``2026-11-25T10:00:00.000Z``)
    at: str
    #: a merged reader's resume point (every app's position, ``worker.events_merged``); None
    #: from one stream, where ``stream_id`` is the resume point
    cursor: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"event": "intent", **_without_nones(asdict(self), ("cursor",))}


@dataclass(frozen=True)
class Gap:
    """Entries after ``from_id`` were trimmed before this reader saw them; reading goes on at
    ``first_id`` (None: the stream is empty now). ``stream_id`` is the last id trimmed, so a
    client that resumes from it is not told of the same gap twice."""

    stream_id: str
    from_id: str
    first_id: str | None
    #: the app whose stream lost the entries, where each app has its own (a Redis Cluster store)
    app: str | None = None
    #: a merged reader's resume point, as ``Event.cursor``
    cursor: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"event": "gap", **_without_nones(asdict(self), ("app", "cursor"))}


def _without_nones(fields: dict[str, Any], optional: Sequence[str]) -> dict[str, Any]:
    """``fields`` without the ``optional`` ones that are None (one stream's items are unchanged)."""
    return {k: v for k, v in fields.items() if v is not None or k not in optional}


def parse_from(value: str | None, name: str = "from") -> str:
    """A reader's start: ``0`` (everything kept), ``$`` (only what comes next) or a stream id
    (``1764064800000-0``, or just its milliseconds): read what comes after it."""
    text = (value or "0").strip()
    if text in ("0", "$"):
        return text
    if not _STREAM_ID.match(text):
        raise IntentError(name, f"must be 0, $ or a stream id like 1764064800000-0, got {text[:40]!r}")
    return text if "-" in text else f"{text}-0"


def parse_state(value: str | None, name: str = "state") -> str | None:
    """An optional state filter: one of ``EVENT_STATES``."""
    if value is None or value == "":
        return None
    if value not in EVENT_STATES:
        raise IntentError(name, f"must be one of {', '.join(EVENT_STATES)}, got {value[:40]!r}")
    return value


def stream_order(value: str) -> tuple[int, int]:
    """A stream id as (ms, seq), to compare ids in their order."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt_int(value: str) -> int | None:
    return int(value) if value not in ("", None) else None


def _pairs(value: Any) -> Iterable[tuple[Any, Any]]:
    """A reply's ``(name, value)`` pairs: redis-py parses XRANGE's fields and XINFO STREAM into
    dicts, but a cluster client's transaction hands them back as flat ``[name, value, …]`` lists
    or as dicts keyed by bytes."""
    if isinstance(value, (list, tuple)):
        return zip(value[0::2], value[1::2], strict=False)
    return value.items()  # type: ignore[no-any-return]


def _mapping(value: Any) -> Mapping[Any, Any]:
    """A reply as a mapping with text keys (``_pairs``)."""
    return {_text(k): v for k, v in _pairs(value)}


def to_event(stream_id: str, fields: Mapping[Any, Any]) -> Event:
    """An entry as emit() wrote it (empty strings for nulls, ``at`` in epoch ms) as an Event."""
    f = {_text(k): _text(v) for k, v in _pairs(fields)}
    verified = f.get("verified", "")
    return Event(
        stream_id=stream_id, id=f.get("id", ""), app=f.get("app") or "default",
        operator_type=int(f.get("operator_type") or 0), state=f.get("state", ""),
        verified=None if verified == "" else verified == "1",
        error=f.get("error") or None, result_code=f.get("result_code") or None,
        ret_code=_opt_int(f.get("ret_code", "")), attempts=int(f.get("attempts") or 0),
        at=iso_ms(int(f.get("at") or 0)))


def queue_stream_info(pipe: Any, key: str) -> None:
    """Queue XINFO STREAM and the count of entries ever added that emit() keeps beside the
    stream (two replies: pass them to ``stream_info``)."""
    pipe.xinfo_stream(key)
    pipe.get(key + EVENTS_ADDED_SUFFIX)


def stream_info(info: Any, added: Any) -> Any:
    """XINFO STREAM's reply as a mapping (or its error), with ``entries-added`` taken from
    emit()'s count where Redis has none (before 7.0), so that a stream that never lost an entry
    is known as such on the embedded Redis 6.2 too."""
    if isinstance(info, Exception):
        return info
    merged = dict(_mapping(info))
    if merged.get("entries-added") is None and added is not None and not isinstance(added, Exception):
        merged["entries-added"] = int(added)
    return merged


def as_replies(info: Any, entries: Any) -> tuple[Any, Any]:
    """XINFO STREAM's and XRANGE's replies as redis-py parses them outside a transaction: a
    cluster client's ``MULTI`` (redis-py 8) hands them back raw, as flat lists."""
    if not isinstance(info, Exception):
        info = _mapping(info)
    return info, [(raw_id, _mapping(fields)) for raw_id, fields in entries]


class Cursor:
    """What a reader knows between reads: where it is, what it filters, whether a gap is due.
    The I/O is the sync or asyncio reader's; the decisions are here, once."""

    def __init__(self, key: str, from_id: str = "0", *, state: str | None = None,
                 count: int = READ_COUNT, app: str | None = None) -> None:
        self.key = key
        start = parse_from(from_id)
        self.state = parse_state(state)
        self.count = count
        #: named on the gaps (a Redis Cluster store's streams are per app)
        self.app = app
        #: the last id handed out (or skipped by the state filter); None until "$" is resolved
        self.cursor: str | None = None if start == "$" else ("0-0" if start == "0" else start)
        #: where reading started: the id given, the end "$" found, or from "0" the id just
        #: before the first entry kept at the first read (None until known)
        self.floor: str | None = start if start not in ("0", "$") else None
        # from "0" the first read takes whatever is there: what was trimmed before is no gap
        self._check_gap = start != "0"
        self.caught_up = False

    def _end(self, last: Sequence[Any] | None) -> str:
        self.floor = _text(last[0][0]) if last else "0-0"
        return self.floor

    def _take(self, info: Any, entries: Any) -> list[Event | Gap]:
        """The items of one ``MULTI`` (XINFO STREAM, XRANGE after the cursor); moves the cursor."""
        if isinstance(entries, Exception):
            raise entries
        info, entries = as_replies(info, entries)
        out: list[Event | Gap] = []
        if self.floor is None:  # from "0": what was there first
            self.floor = "0-0" if isinstance(info, Exception) else _first_kept(info)[1]
        # no stream at all: XINFO answers an error, and nothing can have been trimmed
        if not isinstance(info, Exception) and self._check_gap:
            gap = self._gap(info)
            if gap is not None:
                out.append(gap)
        self._check_gap = True
        for raw_id, fields in entries:
            event = to_event(_text(raw_id), fields)
            self.cursor = event.stream_id
            if self.state is None or event.state == self.state:
                out.append(event)
        self.caught_up = len(entries) < self.count
        return out

    def _gap(self, info: Mapping[str, Any]) -> Gap | None:
        """A Gap when entries after the cursor may have been trimmed: the cursor is older than
        the id just before the first entry kept (no entry can lie between those two)."""
        assert self.cursor is not None
        added, length = info.get("entries-added"), int(info.get("length") or 0)
        if added is not None and int(added) == length:  # Redis 7: nothing was ever trimmed
            return None
        first_id, lost_to = _first_kept(info)
        if stream_order(self.cursor) >= stream_order(lost_to):
            return None
        gap = Gap(stream_id=lost_to, from_id=self.cursor, first_id=first_id, app=self.app)
        self.cursor = lost_to
        return gap


def _first_kept(info: Mapping[str, Any]) -> tuple[str | None, str]:
    """(the first id kept or None, the id just before it): with no entry kept, the last id
    ever added (``0-0`` for none), after which whatever comes next lies."""
    first = info.get("first-entry")
    if not first:
        last = info.get("last-generated-id")
        return None, (_text(last) if last else "0-0")
    first_id = _text(first[0])
    ms, seq = stream_order(first_id)
    return first_id, (f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**64 - 1}")



class EventReader(Cursor):
    """Reads the stream at ``key`` from ``from_id`` on, in order, with a ``Gap`` wherever entries
    were lost. ``read()`` returns the next entries (of ``state`` only, when given; gaps always),
    and ``caught_up`` tells whether the last read reached the end of the stream."""

    def __init__(self, client: redis.Redis, key: str, from_id: str = "0", *,
                 state: str | None = None, count: int = READ_COUNT,
                 app: str | None = None) -> None:
        super().__init__(key, from_id, state=state, count=count, app=app)
        self.client = client

    def read(self, block_ms: int | None = None) -> list[Event | Gap]:
        """The next entries after the cursor; when there are none and ``block_ms`` is given,
        waits up to that long for one and reads again."""
        if self.cursor is None:
            self.cursor = self._end(self.client.xrevrange(self.key, "+", "-", count=1))
        out = self._read_once()
        if not out and self.caught_up and block_ms:
            # XREAD only wakes us up; the entries are read by _read_once with its gap check
            self.client.xread({self.key: self.cursor}, count=1, block=block_ms)
            out = self._read_once()
        return out

    def _read_once(self) -> list[Event | Gap]:
        pipe = self.client.pipeline(transaction=True)
        queue_stream_info(pipe, self.key)
        pipe.xrange(self.key, f"({self.cursor}", "+", count=self.count)
        info, added, entries = pipe.execute(raise_on_error=False)
        return self._take(stream_info(info, added), entries)

    def follow(self, *, follow: bool = False, block_ms: int = BLOCK_MS) -> Iterator[Event | Gap]:
        """Everything from the start on; with ``follow``, then each new entry as it comes."""
        while True:
            yield from self.read(block_ms if follow else None)
            if not follow and self.caught_up:
                return


class AsyncEventReader(Cursor):
    """``EventReader`` on ``redis.asyncio`` (for ``AsyncProducer.events``)."""

    def __init__(self, client: redis.asyncio.Redis, key: str, from_id: str = "0", *,
                 state: str | None = None, count: int = READ_COUNT,
                 app: str | None = None) -> None:
        super().__init__(key, from_id, state=state, count=count, app=app)
        self.client = client

    async def read(self, block_ms: int | None = None) -> list[Event | Gap]:
        if self.cursor is None:
            self.cursor = self._end(await self.client.xrevrange(self.key, "+", "-", count=1))
        out = await self._read_once()
        if not out and self.caught_up and block_ms:
            await self.client.xread({self.key: self.cursor}, count=1, block=block_ms)
            out = await self._read_once()
        return out

    async def _read_once(self) -> list[Event | Gap]:
        pipe = self.client.pipeline(transaction=True)
        queue_stream_info(pipe, self.key)
        pipe.xrange(self.key, f"({self.cursor}", "+", count=self.count)
        info, added, entries = await pipe.execute(raise_on_error=False)
        return self._take(stream_info(info, added), entries)

    async def follow(self, *, follow: bool = False,
                     block_ms: int = BLOCK_MS) -> AsyncIterator[Event | Gap]:
        while True:
            for item in await self.read(block_ms if follow else None):
                yield item
            if not follow and self.caught_up:
                return


def read_events(client: redis.Redis, key: str, from_id: str = "0", *, follow: bool = False,
                state: str | None = None, block_ms: int = BLOCK_MS) -> Iterator[Event | Gap]:
    """Iterate the stream at ``key`` from ``from_id`` (``0``, ``$`` or an id, exclusive)."""
    return EventReader(client, key, from_id, state=state).follow(follow=follow, block_ms=block_ms)
