"""``SandboxServer``: the sandbox's lifecycle (bind, start, stop, hold), its Python API for tests
and tools (configure, bindings, stats) and its routing; see the package docstring for what it
models. The TPNS endpoints are answered by :mod:`.api`, the HTTP plumbing is :mod:`.transport`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from .api import TpnsApi
from .auth import SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY
from .config import DEFAULT_FAULTS, SandboxConfig, SandboxConfigError, changed, checked
from .faults import FaultDraw
from .protocol import BATCH_PATH, QUERY_PATH, Item, Refusal, parse_body
from .state import Bindings, Stats
from .transport import Reply, SandboxHTTPServer, json_reply

__all__ = ["BATCH_PATH", "QUERY_PATH", "SandboxConfig", "SandboxConfigError", "SandboxServer"]

#: how often the accept loop checks for stop(); also the longest stop() waits for it
_POLL_S = 0.02


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
                 max_skew_s: float = 600.0, apply_delay_ms: float = 0.0) -> None:
        self._config = checked(SandboxConfig(
            access_id=access_id, secret_key=secret_key, latency_ms=latency_ms,
            fault_rate=fault_rate, faults=tuple(faults), seed=seed,
            invalid_token_prefix=invalid_token_prefix, reject_token_prefix=reject_token_prefix,
            slow_ms=slow_ms, retry_after_s=retry_after_s, max_skew_s=max_skew_s,
            apply_delay_ms=apply_delay_ms))
        self._lock = threading.Lock()
        self._bindings = Bindings()
        self._stats = Stats()
        self._faults = FaultDraw(seed)
        self._api = TpnsApi(self._bindings, self._stats, self._faults)
        self._stopping = threading.Event()
        #: cleared by :meth:`hold`: answers wait (requests are still received and applied)
        self._answering = threading.Event()
        self._answering.set()
        self._serving = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._httpd = SandboxHTTPServer((host, port), self._dispatch, stopping=self._stopping,
                                        answering=self._answering,
                                        in_flight=(BATCH_PATH, self._stats))

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

        Raises ``SandboxConfigError`` for an unknown name or a bad value (nothing changes then).
        """
        with self._lock:
            self._config = changed(self._config, changes)
            if "seed" in changes:
                self._faults.reseed(self._config.seed)

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
        batchoperate answers by ret_code, ``faults`` the injected faults by kind (``lost``: calls
        answered as accepted and never applied); ``unapplied`` the accepted calls that
        ``apply_delay_ms`` still holds back; ``in_flight`` the batchoperate calls received and not
        yet answered, ``in_flight_max`` the most at once.
        """
        return {**self._stats.snapshot(), "unapplied": self._bindings.pending()}

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

    # -- routing (called from the handler threads) --

    def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        path = path.split("?", 1)[0]
        if path in (BATCH_PATH, QUERY_PATH):
            if method != "POST":
                return json_reply({"error": "method not allowed"}, 405, Allow="POST")
            return self._api.batchoperate(self._config, headers, body) if path == BATCH_PATH \
                else self._api.query(self._config, headers, body)
        if (method, path) == ("GET", "/healthz"):
            return json_reply({"ok": True})
        if (method, path) == ("GET", "/sandbox/stats"):
            return json_reply(self.stats())
        if (method, path) == ("POST", "/sandbox/reset"):
            self.reset()
            return json_reply({"ok": True})
        if path == "/sandbox/config" and method in ("GET", "POST"):
            return self._config_endpoint(method, body)
        return json_reply({"error": "not found"}, 404)

    def _config_endpoint(self, method: str, body: bytes) -> Reply:
        if method == "POST":
            changes = parse_body(body)
            if isinstance(changes, Refusal):
                return json_reply({"error": "the body must be a JSON object"}, 400)
            try:
                self.configure(**changes)
            except SandboxConfigError as exc:
                return json_reply({"error": str(exc)}, 400)
        return json_reply(self._config.public())

