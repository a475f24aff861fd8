"""Every app's events stream read as one, for a Redis Cluster store (SPEC §8, issue 16).

On a cluster each app has its own stream (``P{app}:events``, in the app's slot), so a reader that
names no app reads them all: ``MergedEventReader`` keeps one ``worker.events`` reader per app (its
gap logic unchanged: a ``Gap`` names its ``app``) and hands their entries out in time order, by
``(ms, seq)`` of the stream ids, ties by app name. Each app's own order is always kept; across apps
the order is that of what was in the streams when read, so an entry written later with an earlier
id (the masters' clocks differ a little) comes after what was already handed out — late, never lost.

The resume point carries one position per app: every item handed out has a ``cursor``,
``android:1764064800000-3,ios:1764064799990-0`` (app names sorted; each id the last one of that
app handed out, or skipped by the state filter, or where its reading started). It goes where a
stream id goes: ``from``, ``--from``, ``Last-Event-ID`` (``serve`` sends it as the SSE ``id``).

Where each app starts:

* ``0``: everything kept, in every stream; ``$``: only what comes after the first read;
  a stream id (or its milliseconds): what comes after it, in every stream; a cursor: each app
  after its position, an app it does not name from its beginning.
* A ``Gap`` takes its place in the order by its ``stream_id`` (the last id trimmed).
* Apps that join later (configured here or registered by a worker after the reader started, looked
  for on every read through ``apps``) are read from their beginning, also by a reader that started
  at ``$``: a worker registers its apps before it emits anything, so the stream of an app that was
  unknown when the reader started holds only what came after, which is what ``$`` asks for. A
  reader that started at a stream id reads them after that id too. The apps a cursor names are
  read even when no longer known.

A read costs one round trip per app (each stream is on its app's master); a following reader
waits on every app's stream at once, one blocking ``XREAD`` per app (in threads, or tasks).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import replace
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio

from .errors import IntentError
from .events import (
    BLOCK_MS,
    READ_COUNT,
    AsyncEventReader,
    Cursor,
    Event,
    EventReader,
    Gap,
    parse_from,
    parse_state,
    stream_order,
)

_APP = r"[a-z][a-z0-9_-]{0,31}"
_POSITION = rf"{_APP}:\d{{1,20}}-\d{{1,20}}"
_CURSOR = re.compile(rf"^{_POSITION}(,{_POSITION})*$")
#: blocking reads in flight at once (one per app at most); more apps wait their turn
MAX_WAITERS = 64


def parse_start(value: str | None, name: str = "from") -> tuple[str, dict[str, str]]:
    """A merged reader's start: ``0``, ``$``, a stream id (as ``parse_from``), or a cursor
    ``app:id,app:id…`` (then ``("0", positions)``: apps it does not name start at ``0``)."""
    text = (value or "0").strip()
    if ":" not in text:
        try:
            return parse_from(text, name), {}
        except IntentError:
            pass
    elif _CURSOR.match(text) and len(text) <= 64 * 1024:
        positions = dict(part.split(":", 1) for part in text.split(","))
        if len(positions) == text.count(",") + 1:
            return "0", positions
    raise IntentError(name, "must be 0, $, a stream id like 1764064800000-0, or a cursor of "
                            "every app like android:1764064800000-0,ios:1764064800000-2 (each "
                            f"app once), got {text[:60]!r}")


def cursor_text(positions: dict[str, str]) -> str:
    """The ``cursor`` of ``positions``: ``app:id`` by app name, comma-separated."""
    return ",".join(f"{app}:{positions[app]}" for app in sorted(positions))


def _order(app: str, item: Event | Gap) -> tuple[int, int, str]:
    ms, seq = stream_order(item.stream_id)
    return ms, seq, app


R = TypeVar("R", bound=Cursor)


class _Merge(Generic[R]):
    """The decisions of a merged reader (what to read, what to hand out, the cursor); the I/O is
    the sync or asyncio reader's."""

    def __init__(self, key_of: Callable[[str], str], from_id: str = "0", *,
                 state: str | None = None, count: int = READ_COUNT, name: str = "from") -> None:
        self.key_of = key_of
        start, self.positions = parse_start(from_id, name)
        self.state = parse_state(state)
        self.count = count
        #: where apps known at the first read start, and apps that join later
        self._first: str | None = start
        self._later = start if start not in ("0", "$") else "0"
        self.readers: dict[str, R] = {}
        self.buffers: dict[str, deque[Event | Gap]] = {}
        self.caught_up = False

    def _reader(self, app: str, start: str) -> R:
        raise NotImplementedError

    def _add(self, apps: Iterable[str]) -> None:
        """Readers for the apps not read yet (and those the cursor names)."""
        first, self._first = self._first, None
        for app in sorted(set(apps) | set(self.positions)):
            if app not in self.readers:
                start = self.positions.get(app) or (first if first is not None else self._later)
                self.readers[app] = self._reader(app, start)
                self.buffers[app] = deque()

    def _filled(self, app: str, items: list[Event | Gap]) -> None:
        self.buffers[app].extend(items)
        floor = self.readers[app].floor
        if app not in self.positions and floor is not None:
            self.positions[app] = floor

    def _empty(self, *, all_: bool) -> list[str]:
        """Apps to read: every one with nothing buffered, or (``all_`` False) only those that
        have more (an app's buffer ran out in the middle of its stream)."""
        return [app for app, buf in self.buffers.items()
                if not buf and (all_ or not self.readers[app].caught_up)]

    def _hand_out(self, out: list[Event | Gap]) -> bool:
        """Move the first item of all buffers to ``out`` (unless the state filter skips it);
        False when every buffer is empty."""
        heads = [(_order(app, buf[0]), app) for app, buf in self.buffers.items() if buf]
        if not heads:
            return False
        app = min(heads)[1]
        item = self.buffers[app].popleft()
        self.positions[app] = item.stream_id
        if isinstance(item, Gap) or self.state is None or item.state == self.state:
            out.append(replace(item, cursor=cursor_text(self.positions)))
        return True

    def _done(self) -> None:
        self.caught_up = all(not buf and self.readers[app].caught_up
                             for app, buf in self.buffers.items())


class MergedEventReader(_Merge[EventReader]):
    """Reads every app's stream (``key_of(app)``) from ``from_id`` on, merged (module
    docstring); ``apps()`` names the apps (asked on every read, so it should cache).
    ``read()`` and ``follow()`` as ``worker.events.EventReader``'s; ``close()`` after a follow."""

    def __init__(self, client: redis.Redis, key_of: Callable[[str], str],
                 apps: Callable[[], Iterable[str]], from_id: str = "0", *,
                 state: str | None = None, count: int = READ_COUNT, name: str = "from") -> None:
        super().__init__(key_of, from_id, state=state, count=count, name=name)
        self.client = client
        self.apps = apps
        self._waiting: dict[str, futures.Future[Any]] = {}
        self._pool: futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    def _reader(self, app: str, start: str) -> EventReader:
        return EventReader(self.client, self.key_of(app), start, count=self.count, app=app)

    def read(self, block_ms: int | None = None) -> list[Event | Gap]:
        """The next items (at most ``count`` entries looked at); when there are none and
        ``block_ms`` is given, waits up to that long for a new entry in any app's stream."""
        self._add(self.apps())
        out = self._read_once()
        if not out and self.caught_up and block_ms:
            self._wait(block_ms)
            out = self._read_once()
        return out

    def _fill(self, apps: list[str]) -> None:
        for app in apps:
            self._filled(app, self.readers[app].read())

    def _read_once(self) -> list[Event | Gap]:
        out: list[Event | Gap] = []
        self._fill(self._empty(all_=True))
        for _ in range(self.count):
            self._fill(self._empty(all_=False))
            if not self._hand_out(out):
                break
        self._done()
        return out

    def _wait(self, block_ms: int) -> None:
        """One blocking XREAD per app (each on its own master), in threads; returns when one
        has something or ``block_ms`` is up (the others go on waiting for the next call)."""
        if not self.readers:  # no app known yet: nothing to block on, wait for apps to come
            threading.Event().wait(block_ms / 1000)
            return
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(MAX_WAITERS, thread_name_prefix="tpns-events")
            self._stop.clear()
        until = time.monotonic() + block_ms / 1000
        for app, reader in self.readers.items():
            if app not in self._waiting:
                self._waiting[app] = self._pool.submit(
                    self._blocking_read, reader.key, reader.cursor or "0-0", until)
        done, _ = futures.wait(self._waiting.values(), timeout=block_ms / 1000,
                               return_when=futures.FIRST_COMPLETED)
        for app, waiter in list(self._waiting.items()):
            if waiter in done:
                del self._waiting[app]
                waiter.result()  # a Redis error ends the reading, as one stream's would

    def _blocking_read(self, key: str, cursor: str, until: float) -> Any:
        """XREAD of one stream until an entry comes, ``until`` (monotonic), or ``close``: in
        blocks of at most ``BLOCK_MS``, so that closing never waits longer than one."""
        while not self._stop.is_set():
            left_ms = int((until - time.monotonic()) * 1000)
            if left_ms <= 0:
                return []
            got = self.client.xread({key: cursor}, count=1, block=min(left_ms, BLOCK_MS))
            if got:
                return got
        return []

    def close(self) -> None:
        """Stop the blocking reads' threads and wait for them (a read in flight ends within
        ``BLOCK_MS``), so that no thread outlives the reader and uses its client after it."""
        if self._pool is not None:
            self._stop.set()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._waiting = None, {}

    def follow(self, *, follow: bool = False, block_ms: int = BLOCK_MS) -> Iterator[Event | Gap]:
        """Everything from the start on; with ``follow``, then each new entry as it comes."""
        try:
            while True:
                yield from self.read(block_ms if follow else None)
                if not follow and self.caught_up:
                    return
        finally:
            self.close()


class AsyncMergedEventReader(_Merge[AsyncEventReader]):
    """``MergedEventReader`` on ``redis.asyncio`` (for ``AsyncProducer.events``)."""

    def __init__(self, client: redis.asyncio.Redis, key_of: Callable[[str], str],
                 apps: Callable[[], Awaitable[Iterable[str]]], from_id: str = "0", *,
                 state: str | None = None, count: int = READ_COUNT, name: str = "from") -> None:
        super().__init__(key_of, from_id, state=state, count=count, name=name)
        self.client = client
        self.apps = apps
        self._waiting: dict[str, asyncio.Task[Any]] = {}

    def _reader(self, app: str, start: str) -> AsyncEventReader:
        return AsyncEventReader(self.client, self.key_of(app), start, count=self.count, app=app)

    async def read(self, block_ms: int | None = None) -> list[Event | Gap]:
        self._add(await self.apps())
        out = await self._read_once()
        if not out and self.caught_up and block_ms:
            await self._wait(block_ms)
            out = await self._read_once()
        return out

    async def _fill(self, apps: list[str]) -> None:
        found = await asyncio.gather(*(self.readers[app].read() for app in apps))
        for app, items in zip(apps, found, strict=True):
            self._filled(app, items)

    async def _read_once(self) -> list[Event | Gap]:
        out: list[Event | Gap] = []
        await self._fill(self._empty(all_=True))
        for _ in range(self.count):
            await self._fill(self._empty(all_=False))
            if not self._hand_out(out):
                break
        self._done()
        return out

    async def _wait(self, block_ms: int) -> None:
        if not self.readers:
            await asyncio.sleep(block_ms / 1000)
            return
        for app, reader in self.readers.items():
            if app not in self._waiting:
                self._waiting[app] = asyncio.ensure_future(self.client.xread(
                    {reader.key: reader.cursor or "0-0"}, count=1, block=block_ms))
        done, _ = await asyncio.wait(self._waiting.values(), timeout=block_ms / 1000,
                                     return_when=asyncio.FIRST_COMPLETED)
        for app, waiter in list(self._waiting.items()):
            if waiter in done:
                del self._waiting[app]
                waiter.result()

    async def close(self) -> None:
        """Cancel the blocking reads in flight."""
        waiting, self._waiting = list(self._waiting.values()), {}
        for waiter in waiting:
            waiter.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    async def follow(self, *, follow: bool = False,
                     block_ms: int = BLOCK_MS) -> AsyncIterator[Event | Gap]:
        try:
            while True:
                for item in await self.read(block_ms if follow else None):
                    yield item
                if not follow and self.caught_up:
                    return
        finally:
            await self.close()
