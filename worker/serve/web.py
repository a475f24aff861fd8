"""The routes of the status page: the page, its assets, sign-in and sign-out, and the JSON it
refreshes from (``/v1/overview``, ``/v1/timeline``), plus ``POST /v1/requeue-failed``.

Who may call them is ``worker.serve.session.Auth``'s business; these only read what it decided
(``request.state.auth``) to choose between the figures and the sign-in form.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..intents import is_id
from ..monitor.overview import read_overview
from ..producer import Producer
from ..timeline import read_timeline
from .body import BodyError, media_type, read_limited
from .page import HTML_HEADERS, render_page, render_signin
from .session import COOKIE, SESSION_TTL_S, Sessions

logger = logging.getLogger(__name__)

#: the page's assets (``worker/serve/static``, package data) and their content types
STATIC = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
#: a sign-in or requeue body is a few bytes; anything longer is not one
_SMALL_BODY = 4096
#: a 401 is a 401 for every client: scripts read the scheme, browsers show the form
_SIGNIN_HEADERS = {**HTML_HEADERS, "WWW-Authenticate": 'Bearer realm="tpns-batcher"'}


def _static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return JSONResponse({"error": "not found"}, status_code=404)
    data = resources.files("worker.serve").joinpath("static", name).read_bytes()
    # no-cache: revalidated on each load, so an upgraded server never runs yesterday's script
    return Response(data, headers={"Content-Type": STATIC[name], "Cache-Control": "no-cache",
                                   "X-Content-Type-Options": "nosniff"})


async def _small_body(request: Request, media: str, refusal: str) -> bytes | Response:
    """The body of a small request of type ``media``, or the answer refusing it (415 with
    ``refusal`` for another type; the size or read error otherwise)."""
    if media_type(request.headers.get("content-type")) != media:
        return JSONResponse({"error": refusal}, status_code=415)
    try:
        return await read_limited(request, _SMALL_BODY)
    except BodyError as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _requeue_filter(request: Request) -> str | Response | None:
    """The ``error`` a ``POST /v1/requeue-failed`` asks for (None: every failure), or the
    answer refusing its body."""
    # JSON only: another site's page cannot send it without a CORS preflight
    body = await _small_body(request, "application/json",
                             "send application/json (an object, optionally with error)")
    if isinstance(body, Response):
        return body
    if not body.strip():
        return None
    try:
        parsed: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("error", ""), str | None):
        return JSONResponse({"error": "body: a JSON object, optionally with error (a string: "
                                      "only failures with this error)", "field": "body"},
                            status_code=400)
    return parsed.get("error") or None


def _auth(request: Request, sessions: Sessions | None) -> str | None:
    """``bearer``, ``session``, None (a stranger), or ``open`` when no token is configured."""
    if sessions is None:
        return "open"
    auth = getattr(request.state, "auth", None)
    return str(auth) if auth else None


async def _signin(request: Request, sessions: Sessions | None) -> Response:
    """``POST /signin``: the form's token for a session cookie, or the form again."""
    if sessions is None:
        return JSONResponse({"error": "no sign-in: TPNS_API_TOKEN is not set"},
                            status_code=404)
    body = await _small_body(request, "application/x-www-form-urlencoded",
                             "send the form: application/x-www-form-urlencoded "
                             "with token=<TPNS_API_TOKEN>")
    if isinstance(body, Response):
        return body
    given = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
    if not sessions.token_matches(given):
        logger.warning("sign-in refused from %s: wrong token",
                       request.client.host if request.client else "?")
        return HTMLResponse(render_signin("Wrong token."), status_code=401,
                            headers=_SIGNIN_HEADERS)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, sessions.issue(), max_age=SESSION_TTL_S, path="/",
                        secure=request.url.scheme == "https", httponly=True,
                        samesite="strict")
    return response


def page_routes(producer: Producer, sessions: Sessions | None) -> list[Route]:
    """The routes above, over ``producer``; ``sessions`` is None when no token is configured."""

    def status_page(request: Request) -> Response:
        auth = _auth(request, sessions)
        if auth is None:
            return HTMLResponse(render_signin(), status_code=401, headers=_SIGNIN_HEADERS)
        intent_id = request.query_params.get("id", "").strip() or None
        status = producer.status(intent_id) if intent_id and is_id(intent_id) else None
        figures = read_overview(producer.store, producer.apps())
        nonce = request.state.session_nonce if auth == "session" else None
        html = render_page(figures, intent_id, status.to_dict() if status else None,
                           csrf=sessions.csrf(nonce) if sessions and nonce else None,
                           signed_in=auth == "session")
        code = 404 if intent_id and status is None else 200
        return HTMLResponse(html, status_code=code, headers=HTML_HEADERS)

    async def signin(request: Request) -> Response:
        return await _signin(request, sessions)

    def signout(request: Request) -> Response:
        response = JSONResponse({"signed_out": _auth(request, sessions) == "session"})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    def overview(request: Request) -> Response:
        return JSONResponse(read_overview(producer.store, producer.apps()))

    def timeline(request: Request) -> Response:
        store = producer.store
        scopes = [store.scope(app) for app in store.apps_of(producer.apps())]
        return JSONResponse(read_timeline(producer.redis, *scopes))

    async def requeue_failed(request: Request) -> Response:
        wanted = await _requeue_filter(request)
        if isinstance(wanted, Response):
            return wanted
        ids = await run_in_threadpool(producer.requeue_failed, wanted)
        return JSONResponse({"requeued": len(ids), "ids": ids})

    def route(path: str, endpoint: Callable[..., Any], method: str) -> Route:
        return Route(path, endpoint, methods=[method])

    return [
        route("/", status_page, "GET"),
        route("/static/{name}", _static, "GET"),
        route("/signin", signin, "POST"),
        route("/signout", signout, "POST"),
        route("/v1/overview", overview, "GET"),
        route("/v1/timeline", timeline, "GET"),
        route("/v1/requeue-failed", requeue_failed, "POST"),
    ]
