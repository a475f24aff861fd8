"""Group commit: concurrent single-item callers share one store call (SPEC §8, issue 13).

Many threads calling ``Producer.submit`` at once, or many requests ``POST``-ing one intent each to
``serve``, would each pay a whole Redis round trip and a script call for one intent. Here they
queue instead, and one of them — the *leader* — stores what is queued in one call, then hands
each caller its own answer: its id or its own error. While a call is in flight, the next
callers queue behind it, and the first of them leads the next call.

A lone caller pays nothing: it leads at once, and no window is waited. A leader waits (at most
``window_s``) only for callers already on their way in — those preparing their item (validating)
right now, counted by ``GroupCommit.run``, and those the last calls carried (the callers they
answered are typically back with their next item within microseconds) — so a burst of threads
lands in one call instead of the first one going alone. After a burst, the first lone caller
waits the window once; the next ones not at all.

With ``depth`` > 1, up to that many calls are in flight at once, and a leader takes only its
share (1/``depth``) of the callers about: while one call waits for Redis, the callers of the
next one prepare their items, so Python's work and Redis's overlap instead of taking turns
(``Producer.submit`` from 16 threads, measured in turn on a 2-core box: ~10,600 intents/s
with one call in flight, ~12,700 with two, ~10,900 with three). A caller's call is always
answered before that caller can queue its next item, so one thread's intents are stored in the
order it submitted them.

The leader waiting in its window is woken once, when what it waits for is queued, not at each
arrival: on a small machine every thread switch costs more than the rest of a submit.
``AsyncGroupCommit`` does the same for coroutines on one event loop, where "on their way" is
"runnable now": the leader yields to the loop once before taking its batch.

``commits`` and ``items`` count the calls made and the items they carried (tests and the
benchmark read them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: the most items one call carries: one ``enqueue.lua`` call (``store.ENQUEUE_CHUNK``), so Redis
#: stays responsive between calls and a caller's wait stays bounded
MAX_BATCH = 500
#: the most a leader waits for callers already preparing their item (seconds); ends as soon
#: as they have all queued
WINDOW_S = 0.002

Commit = Callable[[list[T]], list[R | BaseException]]


class _Slot(Generic[T, R]):
    """One caller's item and, once committed, its answer (a value or an exception to raise)."""

    __slots__ = ("answer", "item", "lead", "ready")

    def __init__(self, item: T) -> None:
        self.item = item
        self.answer: R | BaseException | None = None
        #: released when the answer is there, or when this caller was made the next leader (a
        #: bare lock, taken at birth: cheaper to wait on and to wake than an Event)
        self.ready = threading.Lock()
        self.ready.acquire()
        self.lead = False

    def wake(self) -> None:
        self.ready.release()


def _answers(commit: Commit[T, R], items: list[T]) -> list[R | BaseException]:
    """The commit's answers, one per item; an exception of the commit itself is every item's."""
    try:
        answers = commit(items)
    except Exception as exc:  # a bug or an unexpected error: every caller hears of it
        return [exc] * len(items)
    if len(answers) != len(items):
        error = RuntimeError(f"group commit answered {len(answers)} times for {len(items)} items")
        return [error] * len(items)
    return answers


class GroupCommit(Generic[T, R]):
    """Coalesce concurrent ``run`` calls from many threads into calls of ``commit``.

    ``commit(items)`` stores the items and returns one answer per item, in order: the value the
    caller gets, or an exception instance the caller raises (each caller its own instance).
    """

    def __init__(self, commit: Commit[T, R], *, max_batch: int = MAX_BATCH,
                 window_s: float = WINDOW_S, depth: int = 1) -> None:
        self._commit = commit
        self.max_batch = max_batch
        self.window_s = window_s
        #: the most commits in flight at once
        self.depth = depth
        self._cond = threading.Condition(threading.Lock())  # guards everything below
        self._queue: deque[_Slot[T, R]] = deque()
        #: a leader is chosen and has not taken its batch yet (at most one at a time)
        self._leading = False
        #: commits taken and not yet answered, and the items they carry
        self._in_flight = 0
        self._in_flight_items = 0
        #: the gathering leader waits in its window (``_gather``) for ``_want`` queued items
        self._gathering = False
        self._want = 1
        self._arriving = 0
        #: the callers about (preparing, queued, in flight) when the last call was taken
        self._last = 1
        self.commits = 0
        self.items = 0

    @property
    def queued(self) -> int:
        """Callers queued for the next commit."""
        with self._cond:
            return len(self._queue)

    def run(self, prepare: Callable[[], T]) -> R:
        """``prepare()`` this caller's item (exceptions propagate; nothing is queued), then
        commit it with whatever other callers queued meanwhile; its answer."""
        with self._cond:
            self._arriving += 1
        try:
            item = prepare()
        except BaseException:
            with self._cond:
                self._arriving -= 1
                self._wake_gatherer()
            raise
        slot: _Slot[T, R] = _Slot(item)
        with self._cond:
            self._arriving -= 1
            self._queue.append(slot)
            lead = not self._leading and self._in_flight < self.depth
            if lead:
                self._leading = True
            else:
                self._wake_gatherer()
        if not lead:
            slot.ready.acquire()
            if not slot.lead:
                return self._answer(slot)
        self._lead()
        return self._answer(slot)

    def _gathered(self) -> bool:
        """Whether the gathering leader has what it waits for (lock held)."""
        queued = len(self._queue)
        return queued >= self._want and (
            self.depth > 1 or self._arriving == 0 or queued >= self.max_batch)

    def _wake_gatherer(self) -> None:
        """Wake the leader waiting in its window once it has what it waits for, not before:
        each wake-up is a thread switch, dearer than the rest of a submit (lock held)."""
        if self._gathering and self._gathered():
            self._cond.notify()

    def _gather(self) -> int:
        """Wait (at most ``window_s``, lock held but released while waiting) for the callers on
        their way; how many items to take.

        With one commit at a time, it waits for those preparing their item now, and as many as
        the last call carried — the callers it answered are typically back with their next
        item in a moment — and takes them all. A lone caller (the last call carried one, nobody
        is preparing) does not wait at all. With ``depth`` commits in flight, it waits for and
        takes 1/``depth`` of the callers about (preparing, queued or in flight), so that while
        one commit waits for Redis the next one's callers prepare theirs."""
        about = max(self._last, self._in_flight_items + len(self._queue) + self._arriving)
        self._want = min(self.max_batch, -(-about // self.depth))
        deadline = time.monotonic() + self.window_s
        self._gathering = True
        try:
            while not self._gathered():
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
        finally:
            self._gathering = False
        return self._want if self.depth > 1 else self.max_batch

    @staticmethod
    def _answer(slot: _Slot[T, R]) -> R:
        answer = slot.answer
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[return-value]  # set by the commit before ready

    def _lead(self) -> None:
        """Take a batch (this leader's own slot is at its head), let the next leader start
        gathering if another commit may be in flight, commit, and answer each caller."""
        batch: list[_Slot[T, R]] = []
        answers: list[R | BaseException] = []
        try:
            with self._cond:
                limit = self.max_batch
                try:
                    limit = self._gather()
                finally:  # even interrupted while gathering: the callers must get an answer
                    batch = self._take(limit)
            answers = _answers(self._commit, [s.item for s in batch])
        except BaseException as exc:  # interrupted: no caller may wait forever
            answers = [exc] * len(batch)
            raise
        finally:
            for slot, answer in zip(batch, answers, strict=True):
                slot.answer = answer
                slot.wake()
            with self._cond:
                self._in_flight -= 1
                self._in_flight_items -= len(batch)
                self._next_leader()

    def _take(self, limit: int) -> list[_Slot[T, R]]:
        """This leader's batch, off the queue: its commit is in flight from now (lock held)."""
        batch: list[_Slot[T, R]] = []
        while self._queue and len(batch) < limit:
            batch.append(self._queue.popleft())
        self._last = self._in_flight_items + len(batch) + len(self._queue) + self._arriving
        self._in_flight_items += len(batch)
        self.commits += 1
        self.items += len(batch)
        self._in_flight += 1
        self._leading = False
        self._next_leader()
        return batch

    def _next_leader(self) -> None:
        """Make the first caller queued the next leader, if a leader may start (lock held)."""
        if self._queue and not self._leading and self._in_flight < self.depth:
            self._leading = True
            head = self._queue[0]
            head.lead = True
            head.wake()


class AsyncGroupCommit(Generic[T, R]):
    """``GroupCommit`` for coroutines of one event loop: ``await run(item)``."""

    def __init__(self, commit: Callable[[list[T]], Awaitable[list[R | BaseException]]], *,
                 max_batch: int = MAX_BATCH) -> None:
        self._commit = commit
        self.max_batch = max_batch
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._leader: asyncio.Task[None] | None = None
        self.commits = 0
        self.items = 0

    async def run(self, item: T) -> R:
        """Commit ``item`` with whatever other coroutines queue meanwhile; its answer."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._leader is None:
            # a task of its own, so that a caller cancelled (a client gone) cannot stop the
            # commit that the other callers wait on
            self._leader = asyncio.get_running_loop().create_task(self._lead())
        return await future

    async def _lead(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            # the callers that are runnable now (requests already read) join this call
            await asyncio.sleep(0)
            while self._queue:
                batch = [self._queue.popleft()
                         for _ in range(min(len(self._queue), self.max_batch))]
                try:
                    answers = await self._commit([item for item, _ in batch])
                    if len(answers) != len(batch):
                        raise RuntimeError(f"group commit answered {len(answers)} times for "
                                           f"{len(batch)} items")
                except Exception as exc:
                    answers = [exc] * len(batch)
                self.commits += 1
                self.items += len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._leader = None
            # left only when this task itself was cancelled (the loop is closing)
            for _, future in [*batch, *self._queue]:
                if not future.done():
                    future.cancel()
            self._queue.clear()
