"""Group commit: concurrent single-item callers share one store call (SPEC §8, issue 13).

Many threads calling ``Producer.submit`` at once, or many requests ``POST``-ing one intent each to
``serve``, would each pay a whole Redis round trip and a script call for one intent. Here they
queue instead, and one of them — the *leader* — stores everything queued (up to ``max_batch``)
in one call, then hands each caller its own answer: its id or its own error. While the leader's
call is in flight, the next callers queue behind it, and the first of them leads the next call.

A lone caller pays nothing: it leads at once, and no window is waited. A leader waits (at most
``window_s``) only for callers already on their way in — those preparing their item (validating)
right now, counted by ``GroupCommit.run``, and as many as the last call carried (the callers it
answered are typically back with their next item within microseconds) — so a burst of threads
lands in one call instead of the first one going alone. After a burst, the first lone caller
waits the window once; the next ones not at all. ``AsyncGroupCommit`` does the same for coroutines on one event loop,
where "on their way" is "runnable now": the leader yields to the loop once before taking its batch.

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
                 window_s: float = WINDOW_S) -> None:
        self._commit = commit
        self.max_batch = max_batch
        self.window_s = window_s
        self._cond = threading.Condition()  # guards everything below
        self._queue: deque[_Slot[T, R]] = deque()
        self._leading = False
        self._arriving = 0
        #: items of the last call
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
                self._cond.notify_all()
            raise
        slot: _Slot[T, R] = _Slot(item)
        with self._cond:
            self._arriving -= 1
            self._queue.append(slot)
            lead = not self._leading
            self._leading = True
            self._cond.notify_all()  # a leader in its window counts arrivals
        if not lead:
            slot.ready.acquire()
            if not slot.lead:
                return self._answer(slot)
        self._lead()
        return self._answer(slot)

    def _gather(self) -> None:
        """Wait (at most ``window_s``, lock held but released while waiting) for the callers on
        their way: those preparing their item now, and as many as the last call carried — the
        callers it answered are typically back with their next item in a moment. A lone caller
        (the last call carried one, nobody is preparing) does not wait at all."""
        deadline = time.monotonic() + self.window_s
        while len(self._queue) < self.max_batch and (
                self._arriving > 0 or len(self._queue) < self._last):
            left = deadline - time.monotonic()
            if left <= 0 or not self._cond.wait(left):
                return

    @staticmethod
    def _answer(slot: _Slot[T, R]) -> R:
        answer = slot.answer
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[return-value]  # set by the commit before ready

    def _lead(self) -> None:
        """Take a batch (this leader's own slot is at its head), commit it, answer each caller,
        and make the first caller still queued the next leader."""
        batch: list[_Slot[T, R]] = []
        try:
            with self._cond:
                self._gather()
                while self._queue and len(batch) < self.max_batch:
                    batch.append(self._queue.popleft())
                self._last = len(batch)
            answers = _answers(self._commit, [s.item for s in batch])
            self.commits += 1
            self.items += len(batch)
        except BaseException as exc:  # interrupted: no caller may wait forever
            answers = [exc] * len(batch)
            raise
        finally:
            for slot, answer in zip(batch, answers, strict=True):
                slot.answer = answer
                slot.wake()
            with self._cond:
                if self._queue:
                    head = self._queue[0]
                    head.lead = True
                    head.wake()
                else:
                    self._leading = False


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
