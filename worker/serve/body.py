"""Reading and decoding a ``POST /v1/intents`` body: limits, media types, JSON and JSON Lines.

A body is refused as a whole (``BodyError``, with the HTTP status to answer) only when it cannot be
read at all; otherwise each item is decoded on its own, as the CLI's ``enqueue`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ..errors import IntentError, TpnsBatcherError
from ..jsonin import BOM, MAX_DEPTH, decode_line, iter_lines, loads, split_lines

#: the largest request body accepted (bytes); a larger one is answered 413
MAX_BODY_BYTES = 5 * 1024 * 1024
#: the most intents one request may carry; more is answered 413
MAX_INTENTS = 10_000
JSON_TYPES = frozenset({"application/json"})
JSON_LINES_TYPES = frozenset({"application/x-ndjson", "application/jsonl",
                              "application/x-jsonlines"})


class BodyError(TpnsBatcherError):
    """Raised when a request body is refused as a whole; carries the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ParsedBody:
    """The items of a body in input order: decoded objects, or why an item could not be decoded.

    ``objs[k]`` is item ``positions[k]``; ``lines`` holds the physical line of every item (JSON
    Lines) or is None (a JSON document); ``refused`` maps item index -> decoding error.
    """

    count: int = 0
    objs: list[Any] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    lines: list[int] | None = None
    refused: dict[int, IntentError] = field(default_factory=dict)


def media_type(content_type: str | None) -> str:
    """``application/json`` from ``Application/JSON; charset=utf-8``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_body(body: bytes, kind: str, max_items: int = MAX_INTENTS) -> ParsedBody:
    """Decode a request body of media type ``kind`` into items; raises ``BodyError``.

    A JSON document must be an object (one intent) or a non-empty array (one intent per element).
    JSON Lines skips blank lines and counts physical lines from 1; a line that is not UTF-8 or
    not JSON is refused on its own, like a line of ``tpns-batcher enqueue`` (same decoder).
    """
    if kind in JSON_TYPES:
        return _parse_json(body, max_items)
    return _parse_json_lines(body, max_items)


def _parse_json(body: bytes, max_items: int) -> ParsedBody:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"the body is not UTF-8 (byte {exc.start + 1})") from None
    text = text.removeprefix(BOM)
    if not text.strip():
        raise BodyError(400, "the body is empty")
    try:
        # one level more than a line: the array around the intents
        doc = loads(text, max_depth=MAX_DEPTH + 1)
    except IntentError as exc:
        raise BodyError(400, f"the body is {exc.rule}") from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise BodyError(400, "the body must be a JSON object or an array of objects")
    if not doc:
        raise BodyError(400, "the array holds no intents")
    if len(doc) > max_items:
        raise BodyError(413, f"at most {max_items} intents per request, got {len(doc)}")
    return ParsedBody(count=len(doc), objs=doc, positions=list(range(len(doc))))


def _parse_json_lines(body: bytes, max_items: int) -> ParsedBody:
    parsed = ParsedBody(lines=[])
    assert parsed.lines is not None
    for number, line in iter_lines(split_lines(body)):
        index = parsed.count
        parsed.count += 1
        if parsed.count > max_items:
            raise BodyError(413, f"at most {max_items} intents per request")
        parsed.lines.append(number)
        try:
            parsed.objs.append(decode_line(line, number))
            parsed.positions.append(index)
        except IntentError as exc:
            parsed.refused[index] = exc
    if not parsed.count:
        raise BodyError(400, "the body is empty" if not body.strip() else
                             "the body holds no intents (only blank lines)")
    return parsed


async def read_limited(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, or ``BodyError(413)`` as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise BodyError(413, f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyError(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
