"""The enqueue's hand-written round trips: what each send of one writes (``sends``), and the
blocking store's (``round_trip``; ``worker.astore`` has the asyncio one).

A re-send after a dropped connection marks every intent for the summary lookup
(``Layout.enqueue_calls(..., resent=True)``): its first send may have stored an intent that has
since succeeded and been compacted, and would otherwise be stored again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

T = TypeVar("T")


def sends(first: T, again: Callable[[], T]) -> Callable[[], T]:
    """What each send of a round trip writes: ``first``, then ``again()`` for every re-send after
    a dropped connection (``Layout.enqueue_calls(..., resent=True)``)."""
    sent: list[bool] = []

    def this_send() -> T:
        out = again() if sent else first
        sent.append(True)
        return out

    return this_send


def round_trip(pool: Any, conn: Any, sha: str, keys: Sequence[str],
               calls: Callable[[], Sequence[Sequence[Any]]], min_replicas: int,
               wait_ms: int) -> list[Any]:
    """The blocking store's ``enqueue.lua`` calls (their ``ARGV``s: ``calls()``) and a ``WAIT``
    written at once on ``conn``, taken from ``pool`` and given back here; one reply per command,
    an error reply as its exception. By hand rather than through ``pipeline()``, whose machinery
    cost about as much as the rest of a group commit of a few intents. When the connection
    drops, the client's ``Retry`` sends the calls again as ``calls()`` then makes them
    (``sends``): each id is then also looked up among the summaries."""

    def trip() -> list[Any]:
        sending: list[tuple[Any, ...]] = [("EVALSHA", sha, len(keys), *keys, *args)
                                          for args in calls()]
        if min_replicas > 0:
            sending.append(("WAIT", min_replicas, wait_ms))
        conn.send_packed_command(conn.pack_commands(sending))
        replies: list[Any] = []
        for _command in sending:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:  # the connection stays in step: read on
                replies.append(exc)
        return replies

    try:
        return conn.retry.call_with_retry(trip, lambda _error: conn.disconnect())  # type: ignore[no-any-return]
    except BaseException:  # replies may be left unread: never reuse it
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
