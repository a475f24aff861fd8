"""A whole tpns-batcher stack on this machine, for ``demo`` and ``bench``: Redis, sandbox, workers.

* ``local_redis``: a private Redis (``start_private``, no persistence) owned by the caller, or the
  one ``REDIS_URL`` names under a fresh key prefix, so nothing the caller did not write is touched.
* ``stack_env``: the environment a worker process of the stack gets (the stack's Redis, prefix and
  sandbox; the shell's credentials and config file dropped, so a fake never meets real secrets).
* ``SandboxProcess``: ``tpns-batcher sandbox`` in a process of its own, for a benchmark: there its
  handler threads never wait for the GIL behind the benchmark's own polling, so the answer comes
  after the configured latency and not a few milliseconds later.
* ``WorkerProcess``: one worker command in its own process group (the Celery main process, its
  pool children, embedded beat), stopped as a whole; the end-to-end tests launch theirs with it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
import requests

from ..connections import redis_client
from ..embedded import start_private
from ..keys import DEFAULT_PREFIX


def mixed_intent(roll: float, token: str, account: str, account_type: int = 1005,
                 append_account: tuple[str, int] | None = None) -> dict[str, Any]:
    """One intent of the realistic mix ``demo`` and ``bench`` use, chosen by ``roll`` in [0, 1):
    55 % logins (op 2), 20 % logouts (op 3), 12 % uninstalls (op 4), 8 % account deletions (op 5)
    and 5 % op-1 binds (of ``append_account`` when given)."""
    accounts = [{"account": account, "account_type": account_type}]
    if roll < 0.55:
        return {"operator_type": 2, "token": token, "account_list": accounts}
    if roll < 0.75:
        return {"operator_type": 3, "token": token, "account_list": accounts}
    if roll < 0.87:
        return {"operator_type": 4, "token": token}
    if roll < 0.95:
        return {"operator_type": 5, "account": account, "account_type": account_type}
    acc, kind = append_account or (account, account_type)
    return {"operator_type": 1, "token": token, "account_list": [{"account": acc, "account_type": kind}]}


#: variables of the shell that a stack's workers must not inherit
_DROPPED_VARS = ("TPNS_ACCESS_ID", "TPNS_SECRET_KEY", "TPNS_SECRET_KEY_FILE", "TPNS_APPS",
                 "CELERY_BROKER_URL", "TPNS_CONFIG_FILE")


@dataclass(frozen=True)
class StackRedis:
    """Where the stack keeps its data: a URL, a key prefix of its own, and whether the server is
    private (only then are memory figures such as ``used_memory`` the stack's alone)."""

    url: str
    prefix: str
    private: bool


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (``SCAN MATCH``)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def keys_under(client: redis.Redis, prefix: str) -> Iterator[bytes | str]:
    """The names of the keys that start with ``prefix`` (SCAN: never blocks the server)."""
    yield from client.scan_iter(match=glob_escape(prefix) + "*", count=1000)


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key whose name starts with ``prefix``; how many."""
    keys: Sequence[bytes | str] = list(keys_under(client, prefix))
    for start in range(0, len(keys), 500):
        client.unlink(*keys[start:start + 500])
    return len(keys)


@contextlib.contextmanager
def local_redis(workdir: Path, name: str = "stack") -> Iterator[StackRedis]:
    """``REDIS_URL`` under a fresh prefix when it is set (every key under it deleted on exit: a
    benchmark or a demo leaves nothing behind in the user's Redis), else a private Redis under
    ``workdir`` (with the default prefix: the server is the stack's alone) that is stopped on exit."""
    if os.environ.get("REDIS_URL"):
        prefix = f"tpns-{name}-{uuid.uuid4().hex[:6]}:"
        try:
            yield StackRedis(os.environ["REDIS_URL"], prefix, private=False)
        finally:
            with contextlib.closing(redis_client(os.environ["REDIS_URL"])) as client:
                delete_prefix(client, prefix)
        return
    proc, url = start_private(workdir / "redis")
    try:
        yield StackRedis(url, DEFAULT_PREFIX, private=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it if it has not ended 10 s later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stack_env(redis: StackRedis, base_url: str, **extra: str) -> dict[str, str]:
    """The environment of a worker process of the stack (``extra`` adds ``TPNS_*`` settings)."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_VARS}
    env.update({"REDIS_URL": redis.url, "TPNS_REDIS_PREFIX": redis.prefix,
                "TPNS_BASE_URL": base_url})
    env.update(extra)
    return env


def product_settings_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` that ``Settings.from_env`` reads (for the caller's own producer)."""
    return {k: v for k, v in env.items() if k.startswith(("TPNS_", "REDIS"))}


class SandboxProcess:
    """``tpns-batcher sandbox --port 0`` in a child process; the same ``url``, ``stats()``,
    ``reset()`` and ``stop()`` as an in-process ``SandboxServer`` (through its admin endpoints)."""

    def __init__(self, *options: str, timeout_s: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_VARS}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "sandbox", "--port", "0", *options], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
        assert self.proc.stdout is not None
        # the first line is "TPNS sandbox listening on URL  access id: ..."
        line = self.proc.stdout.readline().decode(errors="replace")
        if "listening on " not in line:
            self.stop()
            raise RuntimeError("the sandbox process did not start")
        self.url = line.split("listening on ", 1)[1].split()[0]
        self._session = requests.Session()
        self._timeout_s = timeout_s

    def stats(self) -> dict[str, Any]:
        reply = self._session.get(self.url + "/sandbox/stats", timeout=self._timeout_s)
        reply.raise_for_status()
        stats: dict[str, Any] = reply.json()
        return stats

    def reset(self) -> None:
        self._session.post(self.url + "/sandbox/reset", timeout=self._timeout_s).raise_for_status()

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if hasattr(self, "_session"):
            self._session.close()


@dataclass
class WorkerProcess:
    """One worker command (``python -m worker.cli worker …`` or the naive worker) in its own
    process group; its output goes to ``log_path``, and it runs in ``cwd`` (default: ours)."""

    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    name: str = "worker"
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def cli_worker(cls, env: Mapping[str, str], log_path: Path, *celery_args: str) -> WorkerProcess:
        """``tpns-batcher worker CELERY_ARGS`` with this interpreter."""
        return cls([sys.executable, "-m", "worker.cli", "worker", *celery_args], env, log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(list(self.argv), env=dict(self.env), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.cwd, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until Celery logs that the worker is ready; ``RuntimeError`` if it exits or is late."""
        deadline = time.monotonic() + timeout_s
        while " ready." not in self.log():
            if not self.alive():
                raise RuntimeError(f"the worker exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not ready after {timeout_s:g} s; "
                                   f"see {self.log_path}")
            time.sleep(0.05)

    def terminate(self) -> None:
        """SIGTERM to the main process only: Celery's warm shutdown (it stops its own pool)."""
        assert self.proc is not None, "not started"
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        """The exit code, once the main process has ended (what it left behind is killed)."""
        assert self.proc is not None, "not started"
        code = self.proc.wait(timeout=timeout_s)
        self._reap()
        return code

    def kill(self) -> None:
        """SIGKILL the whole group (main process, pool children, beat): a crash, nothing runs on."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._reap()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Warm shutdown (SIGTERM to the group), then SIGKILL whatever is left after ``timeout_s``."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            # pool children or beat left behind by an unclean exit of the main process
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
