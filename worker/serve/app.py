"""``tpns-batcher serve``: the HTTP ingest and status API, ``/metrics`` and a status page (SPEC §8).

Built on Starlette and uvicorn: a small, well-kept ASGI toolkit and server, and all this needs —
a handful of routes over the ``Producer``, no ORM, no validation framework (the intents are
checked by ``worker.intents``, the same rules as every other way in).

Routes (with ``TPNS_API_TOKEN`` set, every one but ``/healthz``, the page's assets and sign-in
needs ``Authorization: Bearer <token>`` or the page's session cookie, ``worker.serve.session``)::

    POST /v1/intents        one JSON object, a JSON array, or JSON Lines -> per-item results
    GET  /v1/intents/{id}   the status (SPEC §5), or 404
    GET  /v1/intents?token=T | ?account=A&account_type=N   history by key (``app``, ``limit``)
    GET  /v1/events         the events stream as Server-Sent Events (``from``, ``state``,
                            ``follow``; resumes from ``Last-Event-ID``)
    GET  /v1/stats          the figures of ``tpns-batcher stats --json``
    GET  /healthz           200 when Redis answers, a worker was seen and nothing is paused
    GET  /metrics           Prometheus text (cluster-wide, read from Redis at scrape time)
    GET  /openapi.json      this API described as OpenAPI 3.1
    POST /v1/requeue-failed failed intents back into the queue (``{"error": CODE}`` optional)
    GET  /v1/overview       the status page's figures (stats, workers, recent failures)
    GET  /v1/timeline       the last hour as arrays (``worker.timeline``), for the charts
    GET  /                  the live status page (``/?id=...`` looks an intent up), or the
                            sign-in form; ``/static/*`` its script and stylesheet
    POST /signin, /signout  the page's session cookie (form field ``token``)

``POST /v1/intents`` answers **200 whenever the body could be read**, with one result per item
(``ids[k]`` is null where item ``k`` was refused, and ``errors`` says why): like the CLI's
``enqueue``, each item is accepted or refused on its own, so a partial refusal is not an HTTP
error. Clients check ``refused``. In JSON Lines a line that is not UTF-8 or not JSON is one
refused item; 400 (empty body, or a JSON document that cannot be read), 413 (over the size or
count limit) and 415 (content type) refuse the whole request; bad input never gets a 500. Redis
being unreachable, or back-pressure (``queue_full``), is a 503 with ``Retry-After`` and a JSON
error whose ``stored``, ``refused`` and ``in_doubt`` list the ids of the request's intents by fate;
the server keeps serving, and the next request succeeds once Redis is back.

A request carrying one intent — the common case of a service posting each event as it
happens — goes through ``AsyncProducer`` on the event loop: concurrent requests share one
enqueue call (group commit, ``worker.groupcommit``), each still answered with its own id or
refusal. Other requests and the other routes use the blocking ``Producer`` in Starlette's
threadpool (sync endpoints, or ``run_in_threadpool``): the event loop never waits on Redis.
``POST /v1/intents`` is a plain ASGI endpoint (``worker.serve.intake``), handed the request by a
middleware inside ``Auth`` before the router looks for a route: the same checks and answers, with
less of Starlette's wrapping around the route that takes the most requests.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import click
import redis
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..aproducer import AsyncProducer
from ..errors import ConfigError, StoreUnavailableError
from ..health import check
from ..intents import is_id
from ..monitor.metrics import make_registry, render
from ..producer import Producer
from ..settings import Settings
from ..webhook_state import lag_limits
from .body import MAX_BODY_BYTES, MAX_INTENTS, BodyError, ParsedBody, media_type, parse_body
from .intake import PostIntents, Shortcut, as_unavailable, enqueue_parsed, unavailable_content
from .lookup import events_endpoint, history_endpoint
from .openapi import openapi_schema
from .session import Auth, Sessions
from .web import page_routes

# Re-exported: tests and callers have imported these from here since before the split.
__all__ = [
    "MAX_BODY_BYTES",
    "MAX_INTENTS",
    "UVICORN_OPTIONS",
    "BodyError",
    "ParsedBody",
    "create_app",
    "enqueue_parsed",
    "media_type",
    "openapi_schema",
    "parse_body",
    "serve_command",
    "unavailable_response",
]

logger = logging.getLogger(__name__)

#: how ``serve`` runs uvicorn (and ``bench --ingest`` its bare endpoint, for a fair ratio):
#: uvloop and httptools when installed (``uvicorn[standard]``, a dependency; "auto" falls back
#: to asyncio and h11 where they are not built), no websockets, the lifespan that closes the
#: asyncio Redis connections; no access log line per request (at thousands of posts a second
#: it would cost more than the post: /metrics and the warnings tell what matters)
UVICORN_OPTIONS: dict[str, Any] = {"loop": "auto", "http": "auto", "ws": "none", "lifespan": "on",
                                   "log_config": None, "server_header": False, "access_log": False}
#: seconds ``serve`` waits for open connections when told to stop (event streams never finish)
SHUTDOWN_GRACE_S = 5


def unavailable_response(exc: StoreUnavailableError,
                         parsed: ParsedBody | None = None) -> JSONResponse:
    """503 with ``Retry-After`` for Redis unreachable or ``queue_full`` (``unavailable_content``
    tells what it says)."""
    return JSONResponse(unavailable_content(exc, parsed), status_code=503,
                        headers={"Retry-After": str(exc.retry_after_s)})


def create_app(producer: Producer, settings: Settings,
               aproducer: AsyncProducer | None = None,
               stopping: threading.Event | None = None) -> Starlette:
    """The Starlette application over ``producer`` (its Redis, prefix and known apps) and, for
    single-intent posts, ``aproducer`` (by default one on the same Redis, prefix and wakes; its
    connections belong to the serving event loop, and are closed at the app's shutdown)."""
    # one closure of a few lines per route over ``producer``, read together with the route table
    # at the end
    registry = make_registry(producer.store, producer.apps)
    sessions = Sessions(settings.api_token) if settings.api_token else None
    doors = aproducer or AsyncProducer(producer.redis_url, producer.store.prefix,
                                       settings=producer.settings, wake=producer.wake_sender)
    doors.app_names = producer.app_names  # what one door read, the other knows

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await doors.redis.aclose()  # the wakes are the producer's: it closes them

    def get_intent(request: Request) -> Response:
        intent_id = request.path_params["intent_id"]
        st = producer.status(intent_id) if is_id(intent_id) else None
        if st is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(st.to_dict())

    def get_stats(request: Request) -> Response:
        return JSONResponse(producer.stats())

    def healthz(request: Request) -> Response:
        verdict = check(producer.store, producer.apps,
                        webhook_limits=lag_limits(producer.settings.webhook_url,
                                                  producer.settings.events_maxlen))
        return JSONResponse(verdict.to_dict(), status_code=200 if verdict.ok else 503)

    def metrics(request: Request) -> Response:
        return Response(render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema())

    post_intents = PostIntents(producer, doors)
    routes = [
        Route("/v1/intents", post_intents, methods=["POST"]),
        Route("/v1/intents", history_endpoint(producer), methods=["GET"]),
        Route("/v1/intents/{intent_id}", get_intent, methods=["GET"]),
        Route("/v1/events", events_endpoint(producer, stopping), methods=["GET"]),
        Route("/v1/stats", get_stats, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *page_routes(producer, sessions),
    ]
    redis_down = _redis_down(producer)
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(Auth, sessions=sessions),
                                 Middleware(Shortcut, endpoint=post_intents)],
                     exception_handlers={redis.RedisError: redis_down,
                                         StoreUnavailableError: redis_down})


def _redis_down(producer: Producer) -> Callable[[Request, Exception], Awaitable[Response]]:
    """The handler of a Redis error raised by any route: 503 with the store's error."""

    async def redis_down(request: Request, exc: Exception) -> Response:
        error = as_unavailable(producer, exc)  # also from a route that reads the store directly
        logger.warning("%s %s: %s", request.method, request.url.path, error)
        return unavailable_response(error)

    return redis_down


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
    # an event stream (GET /v1/events) that follows never ends by itself: told to stop, the
    # server sets `stopping`, each stream ends within a read (its client resumes from
    # Last-Event-ID), and past the grace uvicorn cancels whatever is left
    stopping = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            stopping.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(producer, settings, stopping=stopping), host=host,
                            port=port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                            **UVICORN_OPTIONS)
    try:
        Server(config).run()
    finally:
        producer.close()


