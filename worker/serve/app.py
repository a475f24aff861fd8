"""``tpns-batcher serve``: the HTTP ingest and status API, ``/metrics`` and a status page (SPEC §8).

Built on Starlette and uvicorn: a small, well-kept ASGI toolkit and server, and all this needs —
a handful of routes over the ``Producer``, no ORM, no validation framework (the intents are
checked by ``worker.intents``, the same rules as every other way in).

Routes (every one but ``/healthz`` needs ``Authorization: Bearer <TPNS_API_TOKEN>`` when that
variable is set)::

    POST /v1/intents        one JSON object, a JSON array, or JSON Lines -> per-item results
    GET  /v1/intents/{id}   the status (SPEC §5), or 404
    GET  /v1/stats          the figures of ``tpns-batcher stats --json``
    GET  /healthz           200 when Redis answers, a worker was seen and nothing is paused
    GET  /metrics           Prometheus text (cluster-wide, read from Redis at scrape time)
    GET  /openapi.json      this API described as OpenAPI 3.1
    GET  /                  the status page (``/?id=...`` looks an intent up)

``POST /v1/intents`` answers **200 whenever the body could be read**, with one result per item
(``ids[k]`` is null where item ``k`` was refused, and ``errors`` says why): like the CLI's
``enqueue``, each item is accepted or refused on its own, so a partial refusal is not an HTTP
error. Clients check ``refused``. In JSON Lines a line that is not UTF-8 or not JSON is one
refused item; 400 (empty body, or a JSON document that cannot be read), 413 (over the size or
count limit) and 415 (content type) refuse the whole request; bad input never gets a 500. Redis
being unreachable, or back-pressure (``queue_full``), is a 503 with ``Retry-After`` and a JSON
error whose ``stored``, ``refused`` and ``in_doubt`` list the ids of the request's intents by fate;
the server keeps serving, and the next request succeeds once Redis is back.

Every Redis call is blocking, so it runs in Starlette's threadpool (sync endpoints, or
``run_in_threadpool``): the event loop never waits on Redis.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

import click
import redis
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ConfigError, IntentError, StoreUnavailableError, TpnsBatcherError
from ..intents import is_id
from ..jsonin import BOM, MAX_DEPTH, decode_line, iter_lines, loads, split_lines
from ..monitor.metrics import make_registry, render
from ..monitor.overview import WORKER_TTL_S, read_overview
from ..producer import BulkResult, Producer
from ..settings import Settings
from .page import render_page

logger = logging.getLogger(__name__)

#: the largest request body accepted (bytes); a larger one is answered 413
MAX_BODY_BYTES = 5 * 1024 * 1024
#: the most intents one request may carry; more is answered 413
MAX_INTENTS = 10_000
JSON_TYPES = frozenset({"application/json"})
JSON_LINES_TYPES = frozenset({"application/x-ndjson", "application/jsonl",
                              "application/x-jsonlines"})
#: paths that answer without the bearer token (load balancers and orchestrators probe them)
OPEN_PATHS = frozenset({"/healthz"})
_HTML_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                 "form-action 'self'", "Cache-Control": "no-store"}


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


def enqueue_parsed(producer: Producer, parsed: ParsedBody) -> dict[str, Any]:
    """Enqueue the decoded items (blocking) and build the response body of ``POST /v1/intents``.

    Raises ``StoreUnavailableError`` as the producer does; ``unavailable_body`` answers it.
    """
    ids: list[str | None] = [None] * parsed.count
    errors: dict[int, IntentError] = dict(parsed.refused)
    if parsed.objs:
        numbers = ([parsed.lines[k] for k in parsed.positions] if parsed.lines is not None
                   else None)
        result = producer.enqueue(parsed.objs, line_numbers=numbers)
        for k, index in enumerate(parsed.positions):
            ids[index] = result.ids[k]
            if k in result.errors:
                errors[index] = result.errors[k]
    return {
        "ids": ids,
        "errors": _error_list(errors),
        "accepted": sum(1 for i in ids if i is not None),
        "refused": len(errors),
    }


def _error_list(errors: dict[int, IntentError]) -> list[dict[str, Any]]:
    return [{"index": k, "line": err.line, "field": err.field, "reason": err.reason}
            for k, err in sorted(errors.items())]


def unavailable_response(exc: StoreUnavailableError,
                         parsed: ParsedBody | None = None) -> JSONResponse:
    """503 with ``Retry-After`` for Redis unreachable or ``queue_full``: the error (no password
    in it), its code, the ids of the request's intents by fate, and the items refused by the
    input rules (as in a 200 answer)."""
    errors: dict[int, IntentError] = dict(parsed.refused) if parsed is not None else {}
    if parsed is not None and isinstance(exc.result, BulkResult):
        for k, index in enumerate(parsed.positions):
            if k in exc.result.errors:
                errors[index] = exc.result.errors[k]
    body = {"error": str(exc), "code": exc.code, "stored": exc.stored, "refused": exc.refused,
            "in_doubt": exc.in_doubt, "errors": _error_list(errors)}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(exc.retry_after_s)})


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


class BearerAuth:
    """ASGI middleware: with a token set, every path but ``OPEN_PATHS`` needs it as a bearer.

    The comparison is constant-time (``hmac.compare_digest``); the token is never logged.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._token is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              self._token):
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"error": "unauthorized: send Authorization: Bearer <token>"},
                                status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="tpns-batcher"'})
        await response(scope, receive, send)


def health(producer: Producer) -> tuple[bool, dict[str, Any]]:
    """(healthy, body) for ``/healthz``: Redis answers, a worker was seen, no app is paused."""
    try:
        producer.redis.ping()
        workers = producer.store.workers(WORKER_TTL_S)
        pauses = producer.store.pauses(producer.apps())
    except (redis.RedisError, OSError) as exc:
        return False, {"ok": False, "reason": f"redis unreachable ({type(exc).__name__})"}
    body: dict[str, Any] = {"ok": True, "redis": True, "workers": len(workers),
                            "paused": {app: {"seconds_left": round(left, 1), "reason": why}
                                       for app, (left, why) in pauses.items()}}
    if not workers:
        body.update(ok=False, reason=f"no worker seen in the last {WORKER_TTL_S} s")
    elif pauses:
        app, (left, why) = next(iter(sorted(pauses.items())))
        body.update(ok=False, reason=f"sending for app {app} paused ({why}, {left:.0f} s left)")
    return body["ok"], body


def create_app(producer: Producer, settings: Settings) -> Starlette:
    """The Starlette application over ``producer`` (its Redis, prefix and known apps)."""
    registry = make_registry(producer.store, producer.apps)

    async def post_intents(request: Request) -> Response:
        kind = media_type(request.headers.get("content-type"))
        try:
            if kind not in JSON_TYPES and kind not in JSON_LINES_TYPES:
                raise BodyError(415, "send application/json (an object or an array) or "
                                     "application/x-ndjson (JSON Lines)")
            parsed = parse_body(await read_limited(request), kind)
        except BodyError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        try:
            return JSONResponse(await run_in_threadpool(enqueue_parsed, producer, parsed))
        except StoreUnavailableError as exc:
            logger.warning("POST /v1/intents: %s", exc)
            return unavailable_response(exc, parsed)

    def get_intent(request: Request) -> Response:
        intent_id = request.path_params["intent_id"]
        st = producer.status(intent_id) if is_id(intent_id) else None
        if st is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(st.to_dict())

    def get_stats(request: Request) -> Response:
        return JSONResponse(producer.stats())

    def healthz(request: Request) -> Response:
        ok, body = health(producer)
        return JSONResponse(body, status_code=200 if ok else 503)

    def metrics(request: Request) -> Response:
        return Response(render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema())

    def status_page(request: Request) -> Response:
        intent_id = request.query_params.get("id", "").strip() or None
        status = producer.status(intent_id) if intent_id and is_id(intent_id) else None
        figures = read_overview(producer.store, producer.apps())
        html = render_page(figures, intent_id, status.to_dict() if status else None)
        code = 404 if intent_id and status is None else 200
        return HTMLResponse(html, status_code=code, headers=_HTML_HEADERS)

    async def redis_down(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, StoreUnavailableError):  # a route that reads the store directly
            exc = producer.unavailable(exc)
            if not isinstance(exc, StoreUnavailableError):
                raise exc
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return unavailable_response(exc)

    routes = [
        Route("/v1/intents", post_intents, methods=["POST"]),
        Route("/v1/intents/{intent_id}", get_intent, methods=["GET"]),
        Route("/v1/stats", get_stats, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/", status_page, methods=["GET"]),
    ]
    return Starlette(routes=routes,
                     middleware=[Middleware(BearerAuth, token=settings.api_token)],
                     exception_handlers={redis.RedisError: redis_down,
                                         StoreUnavailableError: redis_down})


def _error_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_schema() -> dict[str, Any]:
    """OpenAPI 3.1 description of every route (hand-written: the routes are few and stable)."""
    intent = {"type": "object", "description": "An intent (SPEC §4)", "required": ["operator_type"],
              "properties": {
                  "operator_type": {"type": "integer", "minimum": 1, "maximum": 5},
                  "token": {"type": "string", "maxLength": 64},
                  "account_list": {"type": "array", "maxItems": 20, "items": {
                      "type": "object", "required": ["account"],
                      "properties": {"account": {"type": "string"},
                                     "account_type": {"type": "integer"}}}},
                  "account": {"type": "string"}, "account_type": {"type": "integer"},
                  "app": {"type": "string"}, "id": {"type": "string", "maxLength": 64}}}
    error_items = {"type": "array", "items": {"type": "object", "properties": {
        "index": {"type": "integer"}, "line": {"type": ["integer", "null"]},
        "field": {"type": "string"},
        "reason": {"type": "string", "description": "field: rule"}}}}
    result = {"type": "object", "required": ["ids", "errors", "accepted", "refused"], "properties": {
        "ids": {"type": "array", "items": {"type": ["string", "null"]},
                "description": "One per item in input order; null where refused"},
        "errors": error_items,
        "accepted": {"type": "integer"}, "refused": {"type": "integer"}}}
    error = _error_schema()
    unauthorized = _json(error, "Bearer token missing or wrong (when TPNS_API_TOKEN is set)")
    ids = {"type": "array", "items": {"type": "string"}}
    unavailable = {
        "description": "Redis unreachable (`store_unavailable`) or back-pressure (`queue_full`: "
                       "TPNS_MAX_PENDING reached, or Redis out of memory). Retry after "
                       "`Retry-After` seconds; the server keeps serving.",
        "headers": {"Retry-After": {"description": "Seconds to wait before retrying",
                                    "schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["error", "code", "stored", "refused", "in_doubt"],
            "properties": {
                "error": {"type": "string", "description": "The cause; the Redis URL without "
                                                           "its password"},
                "code": {"type": "string", "enum": ["store_unavailable", "queue_full"]},
                "stored": {**ids, "description": "Ids Redis stored"},
                "refused": {**ids, "description": "Ids not stored (refused whole, or never "
                                                  "sent): safe to send again"},
                "in_doubt": {**ids, "description": "Ids whose reply was lost, or stored without "
                                                   "the replicas' acknowledgement: look them up"},
                "errors": error_items}}}}}
    status = {"type": "object", "description": "An intent's status (SPEC §5)",
              "properties": {"id": {"type": "string"}, "state": {"type": "string", "enum": [
                  "queued", "sending", "retrying", "succeeded", "failed"]}}}
    obj = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "tpns-batcher", "version": "1",
                 "description": "Enqueue TPNS account bind/unbind intents and watch them."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/intents": {"post": {
                "summary": "Enqueue intents: one JSON object, a JSON array, or JSON Lines",
                "description": f"At most {MAX_BODY_BYTES} bytes and {MAX_INTENTS} intents. Each "
                               "item is accepted or refused on its own (200 either way).",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"oneOf": [
                        intent, {"type": "array", "items": intent}]}},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                    "application/jsonl": {"schema": {"type": "string"}}}},
                "responses": {"200": _json(result, "Per-item results"),
                              "400": _json(error, "Empty or undecodable body"),
                              "401": unauthorized,
                              "413": _json(error, "Body or intent count over the limit"),
                              "415": _json(error, "Not JSON or JSON Lines"),
                              "503": unavailable}}},
            "/v1/intents/{intent_id}": {"get": {
                "summary": "The status of one intent",
                "parameters": [{"name": "intent_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json(status, "The status"), "401": unauthorized,
                              "404": _json(error, "Unknown id"), "503": unavailable}}},
            "/v1/stats": {"get": {
                "summary": "Counts per state and operator_type, queue depth, calls, pauses",
                "responses": {"200": _json(obj, "The figures of `tpns-batcher stats --json`"),
                              "401": unauthorized, "503": unavailable}}},
            "/healthz": {"get": {
                "summary": "Health: Redis answers, a worker was seen in 30 s, nothing paused",
                "security": [],
                "responses": {"200": _json(obj, "Healthy"),
                              "503": _json(obj, "Unhealthy; `reason` says why")}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics of the whole cluster",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              "401": unauthorized}}},
            "/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": _json(obj, "OpenAPI 3.1"), "401": unauthorized}}},
            "/": {"get": {
                "summary": "The status page (HTML); `?id=` looks an intent up",
                "parameters": [{"name": "id", "in": "query", "required": False,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "HTML",
                                      "content": {"text/html": {"schema": {"type": "string"}}}},
                              "401": unauthorized,
                              "404": {"description": "HTML; the looked-up id is unknown"},
                              "503": unavailable}}},
        },
    }


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8811, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on.")
def serve_command(host: str, port: int) -> None:
    """Serve the HTTP API, /metrics and the status page.

    POST /v1/intents takes JSON or JSON Lines (for producers in other languages); GET
    /v1/intents/{id}, /v1/stats, /healthz, /metrics, /openapi.json; GET / is the status page.
    With TPNS_API_TOKEN set, every route but /healthz needs ``Authorization: Bearer <token>``.
    """
    import uvicorn

    from ..embedded import guard_embedded
    from ..logs import setup_logging

    try:
        settings = Settings.from_env()
        producer = Producer(settings=settings)
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    setup_logging(settings.log_format)
    guard_embedded(settings.redis_url, settings.data_dir)  # restarts the embedded Redis if it dies
    if settings.api_token is None and not _is_loopback(host):
        logger.warning("serving on %s without TPNS_API_TOKEN: anyone who can reach it may "
                       "enqueue intents", host)
    config = uvicorn.Config(create_app(producer, settings), host=host, port=port,
                            log_config=None, ws="none", lifespan="off", server_header=False)
    try:
        uvicorn.Server(config).run()
    finally:
        producer.close()


