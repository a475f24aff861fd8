"""A webhook receiver for tests: a real HTTP server on a free port of 127.0.0.1, in a thread.

It checks each request's ``X-Tpns-Signature`` against the secret (a bad one is answered 401 and
counted), records every body it got in arrival order, and answers what the test scripts: a list
of statuses for the first requests (then 200), and an optional gate that holds requests until
the test opens it (a slow receiver).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One request as it arrived: its items, and whether its signature was right."""

    items: list[dict[str, Any]]
    signed: bool
    status: int = 200


@dataclass
class WebhookReceiver:
    secret: str
    #: statuses of the first requests, in order (later ones get 200)
    statuses: list[int] = field(default_factory=list)
    #: while cleared, requests wait (at most ``hold_s``) before they are answered
    gate: threading.Event = field(default_factory=threading.Event)
    hold_s: float = 60.0
    requests: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.gate.set()

    def handle(self, body: bytes, signature: str | None) -> int:
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        signed = signature is not None and hmac.compare_digest(signature, expected)
        with self._lock:
            status = self.statuses.pop(0) if self.statuses and signed else 200
            if not signed:
                status = 401
            self.requests.append(Received(json.loads(body), signed, status))
        self.gate.wait(self.hold_s)
        return status

    def delivered(self) -> list[dict[str, Any]]:
        """The items of the requests answered 2xx, in arrival order (duplicates kept)."""
        with self._lock:
            return [item for r in self.requests if r.status == 200 for item in r.items]

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.requests)


def serve(receiver: WebhookReceiver) -> Iterator[str]:
    """Run ``receiver`` until the generator is closed; yields its URL (for a fixture)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = receiver.handle(body, self.headers.get("X-Tpns-Signature"))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-webhook", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        receiver.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def running(secret: str) -> Iterator[tuple[WebhookReceiver, str]]:
    """A receiver checking ``secret`` and its URL, served until the generator is closed: the
    body of the ``receiver`` fixtures (``yield from running(SECRET)``)."""
    hook = WebhookReceiver(secret)
    gen = serve(hook)
    url = next(gen)
    try:
        yield hook, url
    finally:
        gen.close()
