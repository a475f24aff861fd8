"""The lookup routes of ``serve``: history by key (``GET /v1/intents?token=…``) and the events
stream as Server-Sent Events (``GET /v1/events``), both over the core's readers
(``worker.history``, ``worker.events``).

The SSE stream sends each event as ``id: <stream id>`` and ``data: <JSON>``, a gap as
``event: gap`` (on a Redis Cluster store without ``app``, every app's streams merged: the ``id``
is then the merged reader's cursor, ``worker.events_merged``), and a comment every
``KEEPALIVE_S`` while nothing happens, so proxies keep the connection. A browser's
``EventSource`` reconnects by itself with ``Last-Event-ID``, which takes precedence over
``from``. The first read happens before the response starts, so a Redis outage is a 503 like on
every route; one that comes later ends the stream (the client resumes from its last id).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import redis
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import IntentError
from ..events import BLOCK_MS, Event, EventReader, Gap
from ..events_merged import MergedEventReader
from ..history import history_query
from ..producer import Producer

logger = logging.getLogger(__name__)

#: seconds of silence after which a follower gets a comment line (proxies drop idle streams)
KEEPALIVE_S = 15.0
_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _bad(exc: IntentError) -> Response:
    return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)


def history_endpoint(producer: Producer) -> Callable[[Request], Response]:
    def get_history(request: Request) -> Response:
        q = request.query_params
        try:
            query = history_query(token=q.get("token"), account=q.get("account"),
                                  account_type=q.get("account_type"), app=q.get("app"),
                                  limit=q.get("limit"), default_app=producer.settings.default_app)
        except IntentError as exc:
            return _bad(exc)
        found = producer.store.history(query)
        return JSONResponse({"intents": [st.to_dict() for st in found]})

    return get_history


def sse(item: Event | Gap) -> str:
    """One Server-Sent Events message."""
    kind = "event: gap\n" if isinstance(item, Gap) else ""
    return f"{kind}id: {item.cursor or item.stream_id}\ndata: {json.dumps(item.as_dict(), ensure_ascii=False)}\n\n"


Reader = EventReader | MergedEventReader


def _reader(producer: Producer, request: Request) -> tuple[Reader, bool]:
    q = request.query_params
    resume = request.headers.get("last-event-id")
    follow = _FLAGS.get((q.get("follow") or "true").strip().lower())
    if follow is None:
        raise IntentError("follow", "must be true or false")
    reader = producer.event_reader(resume if resume else q.get("from") or "0",
                                   state=q.get("state"), app=q.get("app"),
                                   name="Last-Event-ID" if resume else "from")
    return reader, follow


def events_endpoint(producer: Producer,
                    stopping: threading.Event | None = None) -> Callable[[Request], Any]:
    """``GET /v1/events``; with ``stopping``, following streams end once it is set (the
    server is stopping: without this, an open stream would hold its shutdown)."""

    async def get_events(request: Request) -> Response:
        try:
            reader, follow = _reader(producer, request)
        except IntentError as exc:
            return _bad(exc)
        first = await run_in_threadpool(reader.read)
        return StreamingResponse(_stream(reader, first, follow, stopping),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return get_events


async def _stream(reader: Reader, batch: list[Event | Gap], follow: bool,
                  stopping: threading.Event | None) -> AsyncIterator[str]:
    try:
        async for line in _lines(reader, batch, follow, stopping):
            yield line
    finally:
        if isinstance(reader, MergedEventReader):
            # off the event loop (closing waits up to BLOCK_MS for its blocking reads), and
            # shielded: a client gone cancels this task, but the reader must still be closed
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(reader.close)


async def _lines(reader: Reader, batch: list[Event | Gap], follow: bool,
                 stopping: threading.Event | None) -> AsyncIterator[str]:
    quiet_since = time.monotonic()
    while True:
        for item in batch:
            yield sse(item)
        if batch:
            quiet_since = time.monotonic()
        if (not follow and reader.caught_up) or (stopping is not None and stopping.is_set()):
            return
        if follow and time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        try:
            batch = await run_in_threadpool(reader.read, BLOCK_MS if follow else None)
        except (redis.RedisError, OSError) as exc:
            logger.warning("GET /v1/events: the stream ends, Redis failed: %s", type(exc).__name__)
            return
