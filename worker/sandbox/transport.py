"""The sandbox's HTTP plumbing: a threading ``http.server`` that hands each request to a dispatch
function and writes back the :class:`Reply` it returns, late or never when the reply says so.

Standard library only: the sandbox must start anywhere the package is installed, and one thread
per connection is plenty for a local fake.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Protocol, cast

logger = logging.getLogger(__name__)

#: a larger body is refused with HTTP 413 (20 tokens × 20 accounts is far below this)
MAX_BODY_BYTES = 1 << 20


@dataclass
class Reply:
    """One answer, and how to deliver it."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds to wait before answering (latency, the ``timeout`` fault)
    delay_s: float = 0.0
    #: close the connection without an answer
    drop: bool = False


def json_reply(payload: Any, status: int = 200, **headers: str) -> Reply:
    """A compact JSON answer."""
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), headers=headers)


#: (method, path, lower-cased headers, body) -> the reply
Dispatch = Callable[[str, str, dict[str, str], bytes], Reply]


class InFlight(Protocol):
    """Counts the POSTs to one path from the request read to the answer written (or dropped)."""

    def entered(self) -> None: ...

    def left(self) -> None: ...


class SandboxHTTPServer(ThreadingHTTPServer):
    """Serves ``dispatch``; ``answering`` cleared holds every answer, ``stopping`` set cuts delays
    short and drops the answers still waiting."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], dispatch: Dispatch, *,
                 stopping: threading.Event, answering: threading.Event,
                 in_flight: tuple[str, InFlight] | None = None) -> None:
        self.dispatch = dispatch
        #: (path, counter): the calls in flight on that path, as a client with many sees them
        self.in_flight = in_flight
        self.stopping = stopping
        self.answering = answering
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
            self._write(json_reply({"error": "Content-Length is required"}, 411))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._write(json_reply({"error": f"body must be 0-{MAX_BODY_BYTES} bytes"}, 413))
            return
        self._serve(self.rfile.read(length))

    def _serve(self, body: bytes) -> None:
        server = cast(SandboxHTTPServer, self.server)
        counter = server.in_flight[1] if server.in_flight is not None and \
            self.command == "POST" and self.path.split("?", 1)[0] == server.in_flight[0] else None
        if counter is not None:
            counter.entered()
        try:
            self._answer(server, body)
        finally:
            if counter is not None:
                counter.left()

    def _answer(self, server: SandboxHTTPServer, body: bytes) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            reply = server.dispatch(self.command, self.path, headers, body)
        except Exception:
            logger.exception("sandbox: %s %s failed", self.command, self.path)
            reply = Reply(500, b"sandbox: internal error\n", "text/plain; charset=utf-8")
        if reply.delay_s > 0:
            server.stopping.wait(reply.delay_s)
        server.answering.wait()
        if reply.drop or server.stopping.is_set():
            self.close_connection = True
            return
        self._write(reply)

    def _write(self, reply: Reply) -> None:
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
