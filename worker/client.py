"""The TPNS client: one ``batchoperate`` call over HTTP, its auth and its in-call retries (the
request body and the parse of the answer are ``worker.tpns_wire``'s).

``TpnsClient.batchoperate`` either returns a ``CallResult`` (ret_code 0, 1008026 or 1008027: the
items are then judged one by one, see ``worker.outcomes``) or raises one of the ``TpnsError``
classes of ``worker.errors``. Transient failures are retried inside the call with tenacity
(bounded by attempts and, optionally, by a time budget); what is still failing after that is
raised for the caller to turn into item outcomes (SPEC §6).

No exception, log record or ``repr`` made here carries the secret key: requests' own exceptions
(which hold the prepared request and its headers) are never chained, only their class name is kept.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import requests
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.structures import CaseInsensitiveDict
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from .auth import basic_header, sign_headers
from .errors import (
    BadResponseError,
    ConfigError,
    HttpStatusError,
    RateLimitedError,
    TpnsError,
    TransientError,
    TransportError,
)
from .model import BatchItem
from .settings import AppConfig
from .tpns_codes import (
    BATCHOPERATE_PATH,
    CREDENTIALS_RET_CODES,
    ITEM_LEVEL_RET_CODES,
    MAX_ITEMS_PER_CALL,
    NOTHING_BOUND,
    QUERY_PATH,
    RATE_LIMITED_RET_CODE,
    REJECTED_RET_CODES,
    RETRY_AFTER_CAP_S,
    SERVICE_ERROR_RET_CODE,
    CallResult,
    classify_call,
)
from .tpns_wire import build_body, encode_body, parse_body, ret_code_error, retry_after_s

# the codes are SPEC §6's (worker.tpns_codes), the body builders worker.tpns_wire's; the names
# stay importable from here as well
__all__ = ["BATCHOPERATE_PATH", "CREDENTIALS_RET_CODES", "ITEM_LEVEL_RET_CODES",
           "MAX_ITEMS_PER_CALL", "RATE_LIMITED_RET_CODE", "REJECTED_RET_CODES",
           "SERVICE_ERROR_RET_CODE", "USER_AGENT", "CallResult", "TpnsClient", "build_body",
           "encode_body"]

logger = logging.getLogger(__name__)

def _version() -> str:
    try:
        return metadata.version("tpns-batcher")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0"


USER_AGENT = f"tpns-batcher/{_version()}"


class _StopAfterBudget(stop_base):
    """Stop when the coming sleep would end at or after ``budget_s`` since the call started.

    Measured with the client's injectable clock (tenacity's own ``stop_before_delay`` reads the
    monotonic clock, which an injected ``sleep`` does not move).
    """

    def __init__(self, budget_s: float, started: float, clock: Callable[[], float]) -> None:
        self.budget_s = budget_s
        self.started = started
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        elapsed = self.clock() - self.started
        return elapsed + retry_state.upcoming_sleep >= self.budget_s


def _pooled_session(url: str, pool_size: int) -> tuple[requests.Session, bool | str]:
    """A session for ``url`` whose pool keeps ``pool_size`` connections per host, and the
    ``verify`` value its requests pass.

    The environment (``HTTPS_PROXY``/``NO_PROXY``, ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``)
    is read here, once, as requests would read it: requests re-reads and decodes all of
    ``os.environ`` on every request otherwise, a third of a call's CPU with many calls in flight.
    """
    if pool_size < 1:
        raise ValueError("pool_size must be at least 1")
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(url))
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return session, verify


class TpnsClient:
    """A client of ``/v3/device/account/batchoperate`` for one app.

    One ``requests.Session`` per client (make one client per app per process): pooled
    connections, an explicit ``(connect, read)`` timeout, TLS verification always on. ``sleep`` and
    ``clock`` are injectable so tests can record the retry schedule instead of waiting;
    ``before_call`` runs before every HTTP attempt (the worker waits for its rate limiter there).
    ``pool_size`` is how many connections the session keeps per host: as many as the calls the
    caller keeps in flight, or urllib3 opens extra ones and drops them again ("Connection pool is
    full, discarding connection").
    A ``session`` passed in stays the caller's: ``close()`` only closes a session it made.
    """

    def __init__(self, app: AppConfig, *, timeout_s: float = 10.0, max_attempts: int = 3,
                 wait_min_s: float = 0.2, wait_max_s: float = 2.0,
                 retry_after_cap_s: float = RETRY_AFTER_CAP_S, budget_s: float | None = None,
                 session: requests.Session | None = None, pool_size: int = 10,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time,
                 before_call: Callable[[], None] | None = None,
                 call_log_level: int = logging.INFO) -> None:
        if not app.access_id or not app.secret_key:
            var = "TPNS_ACCESS_ID" if app.name == "default" else \
                f"TPNS_APP_{app.name.upper()}_ACCESS_ID"
            raise ConfigError(var, f"app {app.name!r} has no credentials")
        if app.auth not in ("sign", "basic"):
            raise ConfigError("TPNS_AUTH", f"must be sign or basic, got {app.auth!r}")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout_s <= 0 or wait_min_s < 0 or wait_max_s < wait_min_s or retry_after_cap_s < 0:
            raise ValueError("timeouts and waits must be positive, wait_min_s <= wait_max_s")
        self.app = app
        self.url = app.base_url.rstrip("/") + BATCHOPERATE_PATH
        self.query_url = app.base_url.rstrip("/") + QUERY_PATH
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.wait_min_s = wait_min_s
        self.wait_max_s = wait_max_s
        self.retry_after_cap_s = retry_after_cap_s
        self.budget_s = budget_s
        self._own_session = session is None
        #: TLS verification is always on: True, or the CA bundle the environment names
        self._verify: bool | str = True
        if session is None:
            session, self._verify = _pooled_session(self.url, pool_size)
        self._session = session
        #: per URL (batchoperate, query): the headers a request prepared once carries (the
        #: session's and ours but the auth), and the transport the session mounts for it
        self._routes: dict[str, tuple[CaseInsensitiveDict[str], BaseAdapter]] = {}
        self._proxies = dict(session.proxies) if self._own_session else None
        #: level of the line logged for an answered attempt (failed ones are INFO, retries
        #: WARNING): the worker logs one line per batch that carries the same fields
        self.call_log_level = call_log_level
        self._sleep = sleep
        self._clock = clock
        self._before_call = before_call
        self._access_id: str = app.access_id
        self._secret: str = app.secret_key
        self._basic = basic_header(app.access_id, app.secret_key)
        # exponential from wait_min_s (0.2, 0.4, 0.8, ...) plus up to wait_min_s of jitter
        self._expo = wait_exponential_jitter(multiplier=wait_min_s, max=wait_max_s,
                                             jitter=wait_min_s, min=wait_min_s)

    def __repr__(self) -> str:
        return f"TpnsClient(app={self.app.name!r}, url={self.url!r}, auth={self.app.auth!r})"

    def __enter__(self) -> TpnsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections (of a session this client made)."""
        if self._own_session:
            self._session.close()

    # -- the call ---------------------------------------------------------------------------

    def batchoperate(self, operator_type: int, items: Sequence[BatchItem]) -> CallResult:
        """Send one ``batchoperate`` call for ``items``, retrying transient failures in-call.

        Returns for ret_code 0, 1008026 and 1008027. Raises ``RejectedError``,
        ``CredentialsError`` (never retried) or, once attempts or budget are spent, the last
        ``TransientError`` (see ``worker.errors``). ``ValueError`` for a batch that
        ``build_body`` refuses.
        """
        return self._call(operator_type, len(items),
                          encode_body(build_body(operator_type, items)), query=False)

    def query(self, body: dict[str, Any]) -> CallResult:
        """Send one ``/v3/device/account/query`` call (SPEC §6.1) with the same auth, in-call
        retries and errors as ``batchoperate``; the answer's JSON is in ``CallResult.data``.
        A ``retCode`` of 10110008 (nothing bound to any key asked) is an answer too."""
        keys = body.get("account_list") or body.get("token_list") or []
        return self._call(int(body["operator_type"]), len(keys), encode_body(body), query=True)

    def _call(self, operator_type: int, count: int, body: bytes, *, query: bool) -> CallResult:
        attempts = 0
        what = "query" if query else "batchoperate"

        def attempt() -> CallResult:
            nonlocal attempts
            attempts += 1
            return self._send_once(operator_type, count, body, attempts, query=query)

        started = self._clock()
        # the first attempt runs outside tenacity: most calls need no retry, and building and
        # running a Retrying per call was a twentieth of a call's CPU. A transient failure is
        # handed to tenacity as its first attempt's outcome, so stops, waits and the warning
        # are the same as if tenacity had run it.
        try:
            return attempt()
        except TransientError as exc:
            first: TransientError | None = exc

        def replay_then_attempt() -> CallResult:
            nonlocal first
            if first is not None:
                failed, first = first, None
                raise failed
            return attempt()

        stop: Any = stop_after_attempt(self.max_attempts)
        if self.budget_s is not None:
            stop = stop | _StopAfterBudget(self.budget_s, started, self._clock)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            code = exc.code if isinstance(exc, TpnsError) else type(exc).__name__
            logger.warning("%s op=%d items=%d attempt %d failed (%s); retrying in %.2fs", what,
                           operator_type, count, state.attempt_number, code, state.upcoming_sleep)

        retrying = Retrying(  # a fresh one per call: Retrying instances are not thread-safe
            retry=retry_if_exception_type(TransientError),
            stop=stop,
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(replay_then_attempt)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            return float(min(max(retry_after, 0.0), self.retry_after_cap_s))
        return float(self._expo(state))

    def _auth_headers(self, body: bytes) -> dict[str, str]:
        if self.app.auth == "basic":
            return self._basic
        return sign_headers(self._access_id, self._secret, body, int(self._clock()))

    def _route(self, url: str) -> tuple[CaseInsensitiveDict[str], BaseAdapter]:
        route = self._routes.get(url)
        if route is None:
            template = self._session.prepare_request(requests.Request("POST", url, headers={
                "Content-Type": "application/json", "Accept": "application/json",
                "User-Agent": USER_AGENT}))
            route = self._routes[url] = (template.headers, self._session.get_adapter(url))
        return route

    def _request(self, url: str, body: bytes) -> tuple[requests.PreparedRequest, BaseAdapter]:
        """The request for ``body`` and the transport to send it with.

        The URL and the session's headers are prepared once per URL; a call only adds its body
        and auth. ``session.post`` (and ``session.send``) would prepare the URL, merge headers,
        cookies, hooks and proxies, read the environment and extract cookies again for every
        call: with many calls in flight in one process that was a sixth of a call's CPU. The
        request still goes through the session's requests transport (its pool, TLS checks).
        """
        headers, adapter = self._route(url)
        request = requests.PreparedRequest()
        request.method = "POST"
        request.url = url
        request.headers = headers.copy()
        request.headers.update(self._auth_headers(body))
        request.headers["Content-Length"] = str(len(body))
        request.body = body
        return request, adapter

    def _send_once(self, operator_type: int, count: int, body: bytes, attempt: int, *,
                   query: bool = False) -> CallResult:
        """One HTTP request: returns a ``CallResult`` or raises the classified ``TpnsError``."""
        what = "query" if query else "batchoperate"
        if self._before_call is not None:
            self._before_call()
        started = time.perf_counter()
        response: requests.Response | None = None
        failure: TpnsError | None = None
        try:
            request, adapter = self._request(self.query_url if query else self.url, body)
            # a caller's session: its proxies as session.send would resolve them
            proxies = self._proxies if self._proxies is not None else \
                self._session.rebuild_proxies(request, self._session.proxies)  # type: ignore[no-untyped-call]
            response = adapter.send(request, stream=False,
                                    timeout=(self.timeout_s, self.timeout_s),
                                    verify=self._verify, proxies=proxies)
            response.content  # noqa: B018 - read within the timeout handling, as send() did
        except requests.Timeout as exc:
            failure = TransportError(f"{what} timed out after {self.timeout_s:g}s "
                                     f"({type(exc).__name__})", code="timeout")
        except requests.RequestException as exc:
            failure = TransportError(f"{what} connection failed ({type(exc).__name__})",
                                     code="connection_error")
        latency_ms = (time.perf_counter() - started) * 1000.0
        # raised outside the ``except`` blocks so that requests' exception (which holds the
        # prepared request and its auth headers) is not even the implicit ``__context__``
        if failure is None:
            assert response is not None
            try:
                failure_or_result = self._classify(response, attempt, latency_ms, query)
            finally:
                response.close()
        else:
            failure_or_result = failure
        fields = {"operator_type": operator_type, "items": count,
                  "ret_code": failure_or_result.ret_code,
                  "http_status": failure_or_result.http_status,
                  "latency_ms": round(latency_ms, 1), "attempt": attempt}
        if isinstance(failure_or_result, TpnsError):
            logger.info("%s op=%d items=%d ret_code=%s error=%s http_status=%s "
                        "latency_ms=%.1f attempt=%d", what, operator_type, count,
                        failure_or_result.ret_code, failure_or_result.code,
                        failure_or_result.http_status, latency_ms, attempt,
                        extra={**fields, "error": failure_or_result.code})
            raise failure_or_result
        logger.log(self.call_log_level, "%s op=%d items=%d ret_code=%d http_status=%d "
                   "latency_ms=%.1f attempt=%d", what, operator_type, count,
                   failure_or_result.ret_code, failure_or_result.http_status, latency_ms,
                   attempt, extra=fields)
        return failure_or_result

    def _classify(self, response: requests.Response, attempt: int, latency_ms: float,
                  query: bool = False) -> CallResult | TpnsError:
        status = response.status_code
        content = response.content  # already read by post() (not streamed)
        parsed = parse_body(content)
        ret_code, err_msg = (parsed[0], self._redact(parsed[1])) if parsed else (None, None)
        kind = classify_call(status, ret_code)
        if kind == "rate_limited":
            retry_after = retry_after_s(response.headers.get("Retry-After"), self._clock())
            return RateLimitedError(
                f"TPNS asked to slow down (HTTP {status}, ret_code {ret_code}, "
                f"Retry-After {retry_after})", retry_after_s=retry_after, ret_code=ret_code,
                http_status=status, err_msg=err_msg)
        if kind == "http_status":
            return HttpStatusError(f"TPNS answered HTTP {status}", code=f"http_{status}",
                                   ret_code=ret_code, http_status=status, err_msg=err_msg)
        if parsed is None or ret_code is None:
            return BadResponseError(
                f"TPNS answered HTTP {status} with a body that is not a JSON object with an "
                f"integer ret_code ({len(content)} bytes)", http_status=status)
        err_msg = err_msg or ""
        if kind == "accepted" or (query and ret_code == int(NOTHING_BOUND)):
            result = parsed[2]
            if result is None:
                return BadResponseError(f"TPNS answered ret_code {ret_code} with a `result` "
                                        "that is not a list", ret_code=ret_code,
                                        http_status=status, err_msg=err_msg)
            return CallResult(ret_code=ret_code, err_msg=err_msg, result=result,
                              http_status=status, attempts=attempt, latency_ms=latency_ms,
                              data=parsed[3] if query else None)
        return ret_code_error(kind, ret_code, err_msg, status)

    def _redact(self, text: str) -> str:
        """A server's message should never echo credentials; make sure ours cannot leak."""
        for secret in (self._secret, self._basic["Authorization"].removeprefix("Basic ")):
            text = text.replace(secret, "***")
        return text
