"""Who may use ``serve``: the bearer token for scripts, a session cookie for the status page.

A browser cannot send a bearer header when it navigates, and ``EventSource`` cannot set headers,
so with ``TPNS_API_TOKEN`` set the page signs in once (``POST /signin`` with the token) and gets
a session cookie: ``HttpOnly`` (scripts on the page cannot read it), ``SameSite=Strict`` (no other
site's page sends it), ``Secure`` over https, expiring after ``SESSION_TTL_S``. The cookie is
``<expiry>.<nonce>.<mac>``: signed with a key derived from the API token (nothing stored in
Redis; changing the token ends every session), and it never carries the token itself.

State-changing requests authenticated by the cookie must carry the CSRF token in the
``X-CSRF-Token`` header: a MAC of the session's nonce (bound to that session), which the page
gets in its HTML and no other origin can read. Bearer requests need none: a browser never adds a
bearer header by itself. Every comparison is constant-time (``hmac.compare_digest``). Whatever
the token, a state-changing request whose ``Origin`` names another site is refused (403): a
server left open on localhost cannot be driven by a page the operator happens to visit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "tpns_session"
CSRF_HEADER = "x-csrf-token"
#: how long a sign-in lasts
SESSION_TTL_S = 12 * 3600
#: paths that answer without the bearer token or a session: probes, the page's own assets, and
#: the page and sign-in themselves (which show the sign-in form to a stranger, no figures)
OPEN_PATHS = frozenset({"/healthz", "/", "/signin"})
OPEN_PREFIXES = ("/static/",)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Sessions:
    """Issues and checks session cookies and their CSRF tokens, under a key from the API token."""

    def __init__(self, api_token: str, clock: Callable[[], float] = time.time) -> None:
        token = api_token.encode()
        self._key = hmac.new(token, b"tpns-batcher session v1", hashlib.sha256).digest()
        self._digest = hashlib.sha256(token).digest()
        self._clock = clock

    def _mac(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the API token (constant-time, and digests of equal length are
        compared, so not even the token's length shows in the timing)."""
        return hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._digest)

    def issue(self) -> str:
        """A new session cookie's value."""
        body = f"{int(self._clock()) + SESSION_TTL_S}.{secrets.token_hex(16)}"
        return f"{body}.{self._mac('s.' + body)}"

    def nonce(self, cookie: str | None) -> str | None:
        """The session's nonce when ``cookie`` is a valid, unexpired session; else None."""
        if not cookie:
            return None
        expiry, _, rest = cookie.partition(".")
        nonce, _, mac = rest.partition(".")
        if not (expiry.isdigit() and nonce and mac):
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(f"s.{expiry}.{nonce}").encode()):
            return None
        return nonce if int(expiry) > self._clock() else None

    def csrf(self, nonce: str) -> str:
        """The CSRF token of the session with ``nonce``."""
        return self._mac("c." + nonce)

    def csrf_matches(self, nonce: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(nonce).encode())


def session_cookie(headers: Headers) -> str | None:
    """The session cookie's value in a request's headers, if any."""
    return cookie_parser(headers.get("cookie", "")).get(COOKIE)


def _cross_origin(headers: Headers) -> bool:
    """Whether a browser says the request comes from a page of another origin than this host."""
    origin = headers.get("origin")
    if origin is None:
        return False  # scripts, curl, same-origin GETs: no Origin header
    host = headers.get("host", "")
    return origin == "null" or urlsplit(origin).netloc.lower() != host.lower()


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class Auth:
    """ASGI middleware: with a token set, every path but the open ones needs the bearer token or
    a session cookie, and a cookie's unsafe methods need the CSRF header too (403 without).

    Sets ``scope["state"]["auth"]`` to ``"bearer"``, ``"session"`` or None (and the session's
    nonce as ``"session_nonce"``) for the page, which decides between figures and a sign-in form.
    The token, the cookie and the CSRF token are never logged.
    """

    def __init__(self, app: ASGIApp, sessions: Sessions | None) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["method"] not in _SAFE_METHODS and _cross_origin(headers):
            # another site's page posting here (a browser always sends Origin on a POST): refused
            # with or without a token configured, so an open server on localhost is no target
            await _refuse(403, "forbidden: a cross-origin request", scope, receive, send)
            return
        if self.sessions is None:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        scheme, _, given = headers.get("authorization", "").partition(" ")
        nonce = self.sessions.nonce(session_cookie(headers))
        if scheme.lower() == "bearer" and self.sessions.token_matches(given):
            state["auth"] = "bearer"
        elif nonce is not None:
            state["auth"], state["session_nonce"] = "session", nonce
        else:
            state["auth"] = None
        if state["auth"] is None and not _is_open(scope["path"]):
            await _refuse(401, "unauthorized: send Authorization: Bearer <token>, or sign in "
                               "on the status page", scope, receive, send)
            return
        if (state["auth"] == "session" and scope["method"] not in _SAFE_METHODS
                and scope["path"] != "/signin"
                and not self.sessions.csrf_matches(nonce or "", headers.get(CSRF_HEADER, ""))):
            await _refuse(403, f"forbidden: a signed-in page's {scope['method']} needs the "
                               "X-CSRF-Token header", scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
    headers = {"WWW-Authenticate": 'Bearer realm="tpns-batcher"'} if status == 401 else {}
    await JSONResponse({"error": message}, status_code=status, headers=headers)(
        scope, receive, send)
