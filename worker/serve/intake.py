"""``POST /v1/intents`` as a plain ASGI app: the door that takes the most requests, kept short.

The other routes are Starlette endpoints (a ``Request`` in, a ``Response`` out). This one answers
thousands of posts a second, one intent each (issue 13), and there Starlette's wrapping — a
``Request`` and its body stream, a ``JSONResponse`` and its header list, one more coroutine per
layer — cost more than the work. So it reads the ASGI messages itself: the same checks in the
same order (415 for a wrong content type, 413 as soon as the body is known to exceed the limit,
then ``body.parse_body``: 400 for an unreadable document, and one result per item), the same
answers, byte for byte (JSON encoded as ``JSONResponse`` encodes it), and the same errors mapped
to the same 503 (a Redis error as the app's exception handler maps it). A client gone before its
body ends gets nothing (where Starlette's ``ClientDisconnect`` became a 500 sent to nobody).

``PostIntents`` is the route's endpoint in the route table; ``Shortcut``, a middleware inside
``Auth`` (which admits or refuses the request first, as for every route), hands it the exact
``POST /v1/intents`` before the exception middleware and the router look for a route. Anything
else, this path under a ``root_path`` included, goes the ordinary way to the same endpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from json.encoder import encode_basestring  # the C encoder of strings JSONEncoder uses
from typing import Any

import redis
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from ..aproducer import AsyncProducer
from ..errors import IntentError, StoreUnavailableError
from ..producer import BulkResult, Producer
from .body import JSON_LINES_TYPES, JSON_TYPES, MAX_BODY_BYTES, BodyError, ParsedBody, media_type, parse_body

logger = logging.getLogger(__name__)

PATH = "/v1/intents"
#: what ``starlette.responses.JSONResponse`` encodes with (one encoder made once, not per answer)
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
_JSON_TYPE = (b"content-type", b"application/json")
_ACCEPTED = b'{"ids":[%s],"errors":[],"accepted":1,"refused":0}'


def json_bytes(content: Any) -> bytes:
    """``content`` as ``JSONResponse(content).body``: compact, UTF-8, no NaN."""
    return _ENCODER.encode(content).encode("utf-8")


def accepted_bytes(intent_id: str) -> bytes:
    """``json_bytes`` of the answer to a body of one intent, stored as ``intent_id`` (the common
    case, written out: the encoder's set-up costs more than the answer)."""
    return _ACCEPTED % encode_basestring(intent_id).encode("utf-8")


async def send_json(send: Send, content: Any, status: int = 200,
                    headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer with ``content`` as JSON: the headers ``JSONResponse`` sends, and ``headers``."""
    await send_body(send, json_bytes(content), status, headers)


async def send_body(send: Send, body: bytes, status: int = 200,
                    headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer with ``body``, JSON already encoded."""
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body)), _JSON_TYPE]})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case, as ASGI gives the names), like
    ``Headers.get``."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(scope: Scope, receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The request body, ``BodyError(413)`` as soon as it is known to exceed ``limit``, or None
    when the client went away before sending all of it (nobody to answer)."""
    declared = header(scope, b"content-length") or ""
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise BodyError(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyError(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def enqueue_parsed(producer: Producer, parsed: ParsedBody) -> dict[str, Any]:
    """Enqueue the decoded items (blocking) and build the response body of ``POST /v1/intents``.

    Raises ``StoreUnavailableError`` as the producer does; ``unavailable_content`` answers it.
    """
    result = None
    if parsed.objs:
        numbers = ([parsed.lines[k] for k in parsed.positions] if parsed.lines is not None
                   else None)
        result = producer.enqueue(parsed.objs, line_numbers=numbers)
    return answer(parsed, result)


def as_unavailable(producer: Producer, exc: Exception) -> StoreUnavailableError:
    """A Redis error as the store's ``StoreUnavailableError`` (answered 503); any other answer
    of Redis (a wrong type, an ACL refusal: ``StoreError``) is raised, as a bug would be."""
    if isinstance(exc, StoreUnavailableError):
        return exc
    error = producer.unavailable(exc)
    if not isinstance(error, StoreUnavailableError):
        raise error from exc
    return error


def answer(parsed: ParsedBody, result: BulkResult | None) -> dict[str, Any]:
    """The response body of ``POST /v1/intents``: ``result`` is the enqueue of ``parsed.objs``."""
    ids: list[str | None] = [None] * parsed.count
    errors: dict[int, IntentError] = dict(parsed.refused)
    if result is not None:
        for k, index in enumerate(parsed.positions):
            ids[index] = result.ids[k]
            if k in result.errors:
                errors[index] = result.errors[k]
    return {
        "ids": ids,
        "errors": error_list(errors),
        "accepted": sum(1 for i in ids if i is not None),
        "refused": len(errors),
    }


def error_list(errors: dict[int, IntentError]) -> list[dict[str, Any]]:
    return [{"index": k, "line": err.line, "field": err.field, "reason": err.reason}
            for k, err in sorted(errors.items())]


def unavailable_content(exc: StoreUnavailableError,
                        parsed: ParsedBody | None = None) -> dict[str, Any]:
    """The body of the 503 for Redis unreachable or ``queue_full``: the error (no password in
    it), its code, the ids of the request's intents by fate, and the items refused by the input
    rules (as in a 200 answer)."""
    errors: dict[int, IntentError] = dict(parsed.refused) if parsed is not None else {}
    if parsed is not None and isinstance(exc.result, BulkResult):
        for k, index in enumerate(parsed.positions):
            if k in exc.result.errors:
                errors[index] = exc.result.errors[k]
    return {"error": str(exc), "code": exc.code, "stored": exc.stored, "refused": exc.refused,
            "in_doubt": exc.in_doubt, "errors": error_list(errors)}


def retry_after(exc: StoreUnavailableError) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(exc.retry_after_s).encode("latin-1"))]


class PostIntents:
    """The ASGI endpoint of ``POST /v1/intents``: a body of one readable intent goes through
    ``doors`` (the group commit, on the event loop), any other through ``producer`` in the
    threadpool."""

    def __init__(self, producer: Producer, doors: AsyncProducer) -> None:
        self.producer = producer
        self.doors = doors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = media_type(header(scope, b"content-type"))
        try:
            if kind not in JSON_TYPES and kind not in JSON_LINES_TYPES:
                raise BodyError(415, "send application/json (an object or an array) or "
                                     "application/x-ndjson (JSON Lines)")
            body = await read_body(scope, receive)
            if body is None:
                return
            parsed = parse_body(body, kind)
        except BodyError as exc:
            await send_json(send, {"error": exc.message}, exc.status)
            return
        try:
            if parsed.count == 1 and parsed.objs:
                result = await self.doors.enqueue_one(
                    parsed.objs[0], line=None if parsed.lines is None else parsed.lines[0])
                stored = result.ids[0]
                if stored is not None and not result.errors:
                    await send_body(send, accepted_bytes(stored))
                    return
                content = answer(parsed, result)
            else:
                content = await run_in_threadpool(enqueue_parsed, self.producer, parsed)
        except (StoreUnavailableError, redis.RedisError) as exc:
            # a Redis error that escaped the producers is mapped as the app's handler maps it
            error = as_unavailable(self.producer, exc)
            logger.warning("POST /v1/intents: %s", error)
            await send_json(send, unavailable_content(error, parsed), 503, retry_after(error))
            return
        await send_json(send, content)


class Shortcut:
    """ASGI middleware: the exact ``POST /v1/intents`` straight to ``endpoint``; the rest on to
    ``app``."""

    def __init__(self, app: ASGIApp, endpoint: PostIntents) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST"
                and not scope.get("root_path")):
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)
