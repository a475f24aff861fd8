"""The TPNS sandbox: a local HTTP server that behaves like TPNS's account API (SPEC §9).

A shipped feature, so anyone can try tpns-batcher without credentials, and what the tests and the
benchmark talk to over real sockets::

    with SandboxServer(seed=1) as sandbox:          # or: tpns-batcher sandbox --port 8810
        requests.post(sandbox.url + "/v3/device/account/batchoperate", ...)

What it models (reference §9):

- ``POST /v3/device/account/batchoperate`` and ``POST /v3/device/account/query`` (any host).
- Both auth methods: the ``AccessId``/``TimeStamp``/``Sign`` headers (HMAC over the raw body,
  ``TimeStamp`` at most ``max_skew_s`` away from now; ``Sign`` wins when both are sent) and HTTP
  Basic. A failure is HTTP 200 with ret_code 1008003.
- Validation with the service's codes (see :mod:`worker.sandbox.state`). A token that starts with
  ``reject_token_prefix`` makes the whole call 1008007, so a client's "halve a rejected call" rule
  can be exercised; one that starts with ``invalid_token_prefix`` is answered ``"1008006"`` for that
  item (no state change for it), which gives 1008026 (some items failed) or 1008027 (all failed).
- Binding state, applied atomically per call. Interpretation of the operator types:
  ops 1 and 2 (1 has meant 2 since 2020) set, for each listed account, ``token[account_type] =
  account``: "override" replaces what the token had *for the account types named* and leaves its
  other types alone (the service keeps one account per type; the docs do not say that a bind clears
  the other types). Within one account_list, a later account of the same type wins. Op 3 removes
  each listed account from the token only when it is the one bound; op 4 removes every account of
  each token; op 5 removes each listed account (type 0 when absent) from all its tokens and answers
  ``"0"`` even when nothing was bound. A missing or empty required list is 1008002.
- The query API answers in camelCase (``retCode``/``errMsg``); each entry is ``"0"``, or
  ``"10110008"`` when nothing is bound. Its op 1 uses a top-level ``account_type`` as the default
  type of accounts that lack one. No item limit is applied to queries (none is documented).
- Fault injection on batchoperate only: with probability ``fault_rate`` (drawn from
  ``random.Random(seed)``, so a seed gives a reproducible sequence) one fault of ``faults``:
  ``http_500``/``http_503``/``http_429`` (that status; 429 with ``Retry-After``), ``1008004``,
  ``1008028`` (with ``Retry-After``), ``drop`` (the connection is closed without an answer) — none
  of these changes state — and ``timeout``: the call is processed normally but answered
  ``slow_ms`` late, like a real server whose answer is slower than the client's timeout (the change
  is applied on receipt, so a client retry can never be overtaken by it). ``latency_ms`` delays
  every answer of the two API paths.
- Admin endpoints, sandbox-only and without auth (bind the sandbox to localhost):
  ``GET /healthz``, ``GET /sandbox/stats``, ``POST /sandbox/reset``, ``GET|POST /sandbox/config``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import Any, cast

import click
from click.core import ParameterSource

from ..auth import verify_basic, verify_sign
from ..errors import ConfigError
from ..settings import SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY
from .state import (
    INVALID_PARAMETER,
    NOTHING_BOUND,
    Bindings,
    Item,
    Refusal,
    Stats,
    parse_batch,
    parse_body,
    parse_query,
)

logger = logging.getLogger(__name__)

DEFAULT_FAULTS = ("http_500", "http_503", "1008004", "1008028", "http_429", "timeout", "drop")
FAULT_KINDS = frozenset(DEFAULT_FAULTS)
BATCH_PATH = "/v3/device/account/batchoperate"
QUERY_PATH = "/v3/device/account/query"
#: a larger body is refused with HTTP 413 (20 tokens × 20 accounts is far below this)
MAX_BODY_BYTES = 1 << 20
#: how often the accept loop checks for stop(); also the longest stop() waits for it
_POLL_S = 0.02
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_ERR_MSG = {0: "NO_ERROR", 1008003: "auth failure", 1008004: "invoke service error",
            1008026: "batch op, partly error", 1008027: "batch op, total error",
            1008028: "request too fast"}


@dataclass(frozen=True)
class SandboxConfig:
    """What :meth:`SandboxServer.configure` may change at runtime (one immutable snapshot)."""

    access_id: str
    secret_key: str = field(repr=False)
    latency_ms: float
    fault_rate: float
    faults: tuple[str, ...]
    seed: int | None
    invalid_token_prefix: str
    reject_token_prefix: str
    slow_ms: float
    retry_after_s: float
    max_skew_s: float

    def public(self) -> dict[str, Any]:
        """The settings without the secret key."""
        out = asdict(self)
        del out["secret_key"]
        out["faults"] = list(self.faults)
        return out


def _checked(config: SandboxConfig) -> SandboxConfig:
    faults = config.faults
    if isinstance(faults, str):
        faults = tuple(f.strip() for f in faults.split(",") if f.strip())
    if not isinstance(faults, Sequence) or not all(isinstance(f, str) for f in faults):
        raise ConfigError("faults", "must be a list of fault names")
    unknown = sorted(set(faults) - FAULT_KINDS)
    if unknown:
        raise ConfigError("faults", f"unknown {', '.join(unknown)} "
                                    f"(known: {', '.join(DEFAULT_FAULTS)})")
    for name in ("access_id", "secret_key"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            raise ConfigError(name, "must be a non-empty string")
    for name in ("invalid_token_prefix", "reject_token_prefix"):
        if not isinstance(getattr(config, name), str):
            raise ConfigError(name, "must be a string (empty disables it)")
    numbers: dict[str, Any] = {}
    for name in ("latency_ms", "fault_rate", "slow_ms", "retry_after_s", "max_skew_s"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value < 0:
            raise ConfigError(name, "must be a finite number >= 0")
        numbers[name] = float(value)
    if numbers["fault_rate"] > 1:
        raise ConfigError("fault_rate", "must be from 0 to 1")
    if config.seed is not None and type(config.seed) is not int:
        raise ConfigError("seed", "must be an integer or null")
    return replace(config, faults=tuple(faults), **numbers)


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds to wait before answering (latency, the ``timeout`` fault)
    delay_s: float = 0.0
    #: close the connection without an answer
    drop: bool = False


def _json(payload: Any, status: int = 200, **headers: str) -> _Reply:
    return _Reply(status, json.dumps(payload, separators=(",", ":")).encode(), headers=headers)


class SandboxServer:
    """A local fake TPNS over real HTTP (see the module docstring for what it models).

    The socket is bound at construction, so :attr:`url` is known before :meth:`start`. A stopped
    server cannot be started again.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 access_id: str = SANDBOX_ACCESS_ID, secret_key: str = SANDBOX_SECRET_KEY,
                 latency_ms: float = 0.0, fault_rate: float = 0.0,
                 faults: Sequence[str] = DEFAULT_FAULTS, seed: int | None = None,
                 invalid_token_prefix: str = "invalid-", reject_token_prefix: str = "reject-",
                 slow_ms: float = 3000.0, retry_after_s: float = 1.0,
                 max_skew_s: float = 600.0) -> None:
        self._config = _checked(SandboxConfig(
            access_id=access_id, secret_key=secret_key, latency_ms=latency_ms,
            fault_rate=fault_rate, faults=tuple(faults), seed=seed,
            invalid_token_prefix=invalid_token_prefix, reject_token_prefix=reject_token_prefix,
            slow_ms=slow_ms, retry_after_s=retry_after_s, max_skew_s=max_skew_s))
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._bindings = Bindings()
        self._stats = Stats()
        self._stopping = threading.Event()
        #: cleared by :meth:`hold`: answers wait (requests are still received and applied)
        self._answering = threading.Event()
        self._answering.set()
        self._serving = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._httpd = _HTTPServer((host, port), self)

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        host, port = self._httpd.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def config(self) -> SandboxConfig:
        """The current settings."""
        return self._config

    def start(self) -> SandboxServer:
        """Serve in a background daemon thread; returns ``self``."""
        if self._stopped:
            raise RuntimeError("a stopped SandboxServer cannot be started again")
        if self._thread is None:
            self._serving = True
            self._thread = threading.Thread(target=self._httpd.serve_forever, args=(_POLL_S,),
                                            name=f"tpns-sandbox-{self.url}", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` (from another thread) or an exception."""
        self._serving = True
        self._httpd.serve_forever(_POLL_S)

    def stop(self) -> None:
        """Stop accepting, close open connections, cut injected delays short; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._answering.set()
        if self._serving:
            self._httpd.shutdown()
        self._httpd.close_connections(timeout_s=2.0)
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def configure(self, **changes: Any) -> None:
        """Change settings at runtime (thread-safe). A new ``seed`` restarts the fault sequence.

        Raises ``ConfigError`` for an unknown name or a bad value (nothing changes then).
        """
        unknown = sorted(set(changes) - set(SandboxConfig.__dataclass_fields__))
        if unknown:
            raise ConfigError(unknown[0], "is not a sandbox setting")
        if isinstance(changes.get("faults"), list):
            changes["faults"] = tuple(changes["faults"])
        with self._lock:
            self._config = _checked(replace(self._config, **changes))
            if "seed" in changes:
                self._rng = random.Random(self._config.seed)

    def hold(self) -> None:
        """Hold every answer until :meth:`release`: requests are received, counted and applied
        as usual, their answers wait. Lets a test see calls in flight for as long as it needs
        (a client's own timeout still applies)."""
        self._answering.clear()

    def release(self) -> None:
        """Send the answers :meth:`hold` kept back, and answer at once again."""
        self._answering.set()

    def bindings_of(self, token: str) -> dict[int, str]:
        """account_type → account currently bound to ``token``."""
        return self._bindings.accounts_of(token)

    def tokens_of(self, account: str, account_type: int = 0) -> set[str]:
        """The tokens currently bound to ``account`` of ``account_type``."""
        return self._bindings.tokens_of(account, account_type)

    def stats(self) -> dict[str, Any]:
        """Counters since start or :meth:`reset`.

        ``calls`` counts every batchoperate request and ``queries`` every query request;
        ``calls_by_op`` (keys "1"–"5"), ``items``, ``max_items_per_call`` and ``items_per_call``
        (the last 10,000) describe what was sent, whatever the outcome; ``ret_codes`` counts the
        batchoperate answers by ret_code, ``faults`` the injected faults by kind.
        """
        return self._stats.snapshot()

    def call_sizes(self) -> list[tuple[int | None, int]]:
        """``(operator_type, items)`` of each call in ``stats()["items_per_call"]``, oldest first."""
        return self._stats.call_sizes()

    def applied(self) -> list[tuple[int, Item]]:
        """``(operator_type, item)`` of every item applied to the bindings (answered ``"0"``), in
        the order applied (the last 100,000): what per-key order looks like from the service."""
        return self._bindings.applied()

    def reset(self) -> None:
        """Forget every binding and zero the stats (the settings stay)."""
        self._bindings.clear()
        self._stats.reset()

    # -- request handling (called from the handler threads) --

    def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Reply:
        path = path.split("?", 1)[0]
        if path in (BATCH_PATH, QUERY_PATH):
            if method != "POST":
                return _json({"error": "method not allowed"}, 405, Allow="POST")
            return self._batchoperate(headers, body) if path == BATCH_PATH \
                else self._query(headers, body)
        if (method, path) == ("GET", "/healthz"):
            return _json({"ok": True})
        if (method, path) == ("GET", "/sandbox/stats"):
            return _json(self.stats())
        if (method, path) == ("POST", "/sandbox/reset"):
            self.reset()
            return _json({"ok": True})
        if path == "/sandbox/config" and method in ("GET", "POST"):
            return self._config_endpoint(method, body)
        return _json({"error": "not found"}, 404)

    def _config_endpoint(self, method: str, body: bytes) -> _Reply:
        if method == "POST":
            changes = parse_body(body)
            if isinstance(changes, Refusal):
                return _json({"error": "the body must be a JSON object"}, 400)
            try:
                self.configure(**changes)
            except ConfigError as exc:
                return _json({"error": str(exc)}, 400)
        return _json(self._config.public())

    def _batchoperate(self, headers: dict[str, str], body: bytes) -> _Reply:
        config = self._config
        payload = parse_body(body)
        self._stats.call(payload)
        delay_s = config.latency_ms / 1000
        fault = self._draw_fault(config)
        if fault is not None:
            self._stats.count(fault=fault)
            if fault == "timeout":
                delay_s += config.slow_ms / 1000
            else:
                reply = self._fault_reply(fault, config)
                reply.delay_s = delay_s
                return reply
        reply = self._batch_answer(config, headers, body, payload)
        reply.delay_s = delay_s
        return reply

    def _draw_fault(self, config: SandboxConfig) -> str | None:
        if config.fault_rate <= 0 or not config.faults:
            return None
        with self._lock:
            if self._rng.random() >= config.fault_rate:
                return None
            return self._rng.choice(config.faults)

    def _fault_reply(self, fault: str, config: SandboxConfig) -> _Reply:
        retry_after = f"{config.retry_after_s:g}"
        if fault == "drop":
            return _Reply(drop=True)
        if fault in ("http_500", "http_503", "http_429"):
            status = int(fault.removeprefix("http_"))
            headers = {"Retry-After": retry_after} if status == 429 else {}
            text = f"sandbox: injected HTTP {status}\n".encode()
            return _Reply(status, text, "text/plain; charset=utf-8", headers)
        ret_code = int(fault)
        reply = self._ret(ret_code, _ERR_MSG[ret_code])
        if ret_code == 1008028:
            reply.headers["Retry-After"] = retry_after
        return reply

    def _ret(self, ret_code: int, err_msg: str, result: list[str] | None = None) -> _Reply:
        self._stats.count(ret_code=ret_code)
        return _json({"ret_code": ret_code, "err_msg": err_msg, "result": result or []})

    def _batch_answer(self, config: SandboxConfig, headers: dict[str, str], body: bytes,
                      payload: dict[str, Any] | Refusal) -> _Reply:
        if not self._authorized(config, headers, body):
            return self._ret(1008003, _ERR_MSG[1008003])
        request = payload if isinstance(payload, Refusal) else parse_batch(payload)
        if isinstance(request, Refusal):
            return self._ret(request.ret_code, request.err_msg)
        prefix = config.reject_token_prefix
        rejected = [t for t in request.tokens if prefix and t.startswith(prefix)]
        if rejected:
            return self._ret(INVALID_PARAMETER,
                             f"invalid parameter: token {rejected[0]!r} is rejected (sandbox)")
        result = self._bindings.apply(request, config.invalid_token_prefix)
        return self._ret(*_batch_code(result), result)

    def _query(self, headers: dict[str, str], body: bytes) -> _Reply:
        config = self._config
        self._stats.count(query=True)
        reply = self._query_answer(config, headers, body)
        reply.delay_s = config.latency_ms / 1000
        return reply

    def _query_answer(self, config: SandboxConfig, headers: dict[str, str],
                      body: bytes) -> _Reply:
        if not self._authorized(config, headers, body):
            return _json({"retCode": 1008003, "errMsg": _ERR_MSG[1008003], "result": []})
        payload = parse_body(body)
        request = payload if isinstance(payload, Refusal) else parse_query(payload)
        if isinstance(request, Refusal):
            return _json({"retCode": request.ret_code, "errMsg": request.err_msg, "result": []})
        out: dict[str, Any]
        if request.operator_type == 1:
            entries = []
            for item in request.items:
                acct = item.accounts[0]
                tokens = sorted(self._bindings.tokens_of(acct.account, acct.account_type))
                entries.append({"account": acct.account, "account_type": acct.account_type,
                                "token_list": tokens})
            result = ["0" if e["token_list"] else NOTHING_BOUND for e in entries]
            out = {"account_tokens": entries}
        else:
            bound = self._bindings.snapshot(request.tokens)
            out = {"token_accounts": [
                {"token": token, "account_list": [{"account": bound[token][t], "account_type": t}
                                                  for t in sorted(bound[token])]}
                for token in request.tokens]}
            result = ["0" if bound[token] else NOTHING_BOUND for token in request.tokens]
        ret_code, err_msg = _batch_code(result)
        return _json({"retCode": ret_code, "errMsg": err_msg, "result": result, **out})

    @staticmethod
    def _authorized(config: SandboxConfig, headers: dict[str, str], body: bytes) -> bool:
        given = headers.get("sign")
        if given is not None:
            access_id = headers.get("accessid", "")
            timestamp = headers.get("timestamp", "")
            if access_id != config.access_id or not _TIMESTAMP.fullmatch(timestamp):
                return False
            if abs(time.time() - int(timestamp)) > config.max_skew_s:
                return False
            return verify_sign(config.secret_key, access_id, timestamp, body, given)
        authorization = headers.get("authorization")
        return authorization is not None and \
            verify_basic(config.access_id, config.secret_key, authorization)


def _batch_code(result: Sequence[str]) -> tuple[int, str]:
    failed = sum(code != "0" for code in result)
    ret_code = 0 if not failed else 1008027 if failed == len(result) else 1008026
    return ret_code, _ERR_MSG[ret_code]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sandbox: SandboxServer) -> None:
        self.sandbox = sandbox
        self._open: set[socket.socket] = set()
        self._open_changed = threading.Condition()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a slow resolver
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_changed:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with self._open_changed:
            self._open.discard(request)
            self._open_changed.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that timed out or went away; not worth a traceback on stderr
        logger.debug("sandbox: error while serving %s", client_address, exc_info=True)

    def close_connections(self, timeout_s: float) -> None:
        """Shut down every open connection and wait (bounded) for their threads to finish."""
        with self._open_changed:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._open_changed.wait_for(lambda: not self._open, timeout=timeout_s)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tpns-sandbox"
    disable_nagle_algorithm = True
    #: buffer the answer so that headers and body leave in one segment
    wbufsize = 1 << 16
    #: an idle keep-alive connection is closed after this many seconds
    timeout = 120

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._write(_json({"error": "Content-Length is required"}, 411))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._write(_json({"error": f"body must be 0-{MAX_BODY_BYTES} bytes"}, 413))
            return
        self._serve(self.rfile.read(length))

    def _serve(self, body: bytes) -> None:
        sandbox = cast(_HTTPServer, self.server).sandbox
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            reply = sandbox._dispatch(self.command, self.path, headers, body)
        except Exception:
            logger.exception("sandbox: %s %s failed", self.command, self.path)
            reply = _Reply(500, b"sandbox: internal error\n", "text/plain; charset=utf-8")
        if reply.delay_s > 0:
            sandbox._stopping.wait(reply.delay_s)
        sandbox._answering.wait()
        if reply.drop or sandbox._stopping.is_set():
            self.close_connection = True
            return
        self._write(reply)

    def _write(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: no line per request on stderr."""


def startup_line(url: str, access_id: str, secret_key: str, secret_source: str | None) -> str:
    """The line ``tpns-batcher sandbox`` prints: the URL and the credentials it accepts.

    The documented sandbox secret is printed (it is public); a secret the user supplied is not,
    only where it came from (``secret_source``, e.g. ``TPNS_SECRET_KEY``).
    """
    if secret_key == SANDBOX_SECRET_KEY or secret_source is None:
        secret = secret_key if secret_key == SANDBOX_SECRET_KEY else "(user-supplied)"
    else:
        secret = f"(from {secret_source})"
    return f"TPNS sandbox listening on {url}  access id: {access_id}  secret: {secret}"


def _faults_option(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    faults = tuple(f.strip() for f in value.split(",") if f.strip())
    unknown = sorted(set(faults) - FAULT_KINDS)
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; "
                                 f"known: {', '.join(DEFAULT_FAULTS)}")
    return faults


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. The admin endpoints have no auth: keep it local.")
@click.option("--port", default=8810, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0 picks a free one).")
@click.option("--latency-ms", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Delay added to every answer.")
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Probability that a batchoperate call gets an injected fault.")
@click.option("--faults", default=",".join(DEFAULT_FAULTS), show_default=True,
              callback=_faults_option, help="Comma-separated fault kinds to draw from.")
@click.option("--seed", type=int, default=None, help="Seed for a reproducible fault sequence.")
@click.option("--access-id", envvar="TPNS_ACCESS_ID", default=SANDBOX_ACCESS_ID,
              show_default=True, help="AccessId to accept [env: TPNS_ACCESS_ID].")
@click.option("--secret-key", envvar="TPNS_SECRET_KEY", default=SANDBOX_SECRET_KEY,
              show_default=False,
              help="Secret key to accept [env: TPNS_SECRET_KEY; default: the documented sandbox "
                   "secret, printed at start].")
@click.option("--invalid-token-prefix", default="invalid-", show_default=True,
              help='Tokens with this prefix are answered as unknown ("1008006").')
@click.option("--reject-token-prefix", default="reject-", show_default=True,
              help="A token with this prefix makes the whole call 1008007 (invalid parameter).")
@click.option("--slow-ms", default=3000.0, show_default=True, type=click.FloatRange(min=0),
              help="How late the 'timeout' fault answers.")
@click.pass_context
def sandbox_command(ctx: click.Context, host: str, port: int, latency_ms: float,
                    fault_rate: float, faults: tuple[str, ...], seed: int | None,
                    access_id: str, secret_key: str, invalid_token_prefix: str,
                    reject_token_prefix: str, slow_ms: float) -> None:
    """Run the TPNS sandbox: a local fake of the TPNS account API.

    It lets you try tpns-batcher without TPNS credentials. It serves the same paths as TPNS
    (/v3/device/account/batchoperate and /v3/device/account/query), checks both auth methods and
    the service's validation rules, keeps the bindings that later calls and queries see, and can
    inject faults (latency, HTTP 5xx/429, 1008004, 1008028, timeouts, dropped connections).

    Without --access-id/--secret-key (or TPNS_ACCESS_ID/TPNS_SECRET_KEY) it accepts a documented,
    public sandbox pair, which it prints at start. Point a worker at it:

    \b
        tpns-batcher sandbox --port 8810
        TPNS_BASE_URL=http://127.0.0.1:8810 tpns-batcher worker

    Tokens starting with "invalid-" are answered as unknown tokens, so partial failures can be
    seen. Sandbox-only admin endpoints: GET /healthz, GET /sandbox/stats, POST /sandbox/reset,
    GET|POST /sandbox/config.
    """
    try:
        server = SandboxServer(host, port, access_id=access_id, secret_key=secret_key,
                               latency_ms=latency_ms, fault_rate=fault_rate, faults=faults,
                               seed=seed, invalid_token_prefix=invalid_token_prefix,
                               reject_token_prefix=reject_token_prefix, slow_ms=slow_ms)
    except (OSError, ConfigError) as exc:
        raise click.ClickException(f"cannot start the sandbox on {host}:{port}: {exc}") from None
    source = ctx.get_parameter_source("secret_key")
    secret_source = ("TPNS_SECRET_KEY" if source is ParameterSource.ENVIRONMENT
                     else "--secret-key" if source is ParameterSource.COMMANDLINE else None)
    click.echo(startup_line(server.url, access_id, secret_key, secret_source))
    previous = _on_sigterm_interrupt()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm_interrupt() -> Any:
    """Make SIGTERM stop the sandbox like Ctrl-C does; the previous handler (None off-main)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
