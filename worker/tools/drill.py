"""Outage drill: measure how fast a worker flushes again after Redis comes back (issue 11).

``python -m worker.tools.drill --outages 1,3,15,60`` starts, on this machine and all private to it:
a ``redis-server`` with AOF (``appendfsync everysec``) on a free port of 127.0.0.1, the sandbox,
and one real ``tpns-batcher worker`` process (store and broker on that Redis). It enqueues a
backlog, and for each outage length SIGKILLs Redis mid-drain, keeps it down that long, restarts it
on the same port and files, and measures the **resume time**: from the first PING that Redis
answers to the worker's next claim (``P seq`` moves). It prints one line per outage and a JSON
summary, and checks that every intent ended terminal and that the worker process never changed.

The integration tests (tests/integration/test_outages.py) use ``AofRedis`` and assert progress
only; this drill reports the figure quoted in the README.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import redis

from ..embedded import redis_server_binary

#: how often the drill polls Redis while timing the resume
POLL_S = 0.01


def free_port() -> int:
    """An ephemeral port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class AofRedis:
    """A ``redis-server`` with AOF on a fixed port and directory: SIGKILL it, start it again.

    ``appendfsync`` is ``everysec`` for the drill (what a deployment runs); the tests that must
    lose nothing acknowledged pass ``always``. ``args`` are more server options (they come last,
    so they win); ``password`` sets ``requirepass`` and goes into ``url`` and ``client``."""

    def __init__(self, directory: Path, port: int | None = None, *, args: Sequence[str] = (),
                 appendfsync: str = "everysec", password: str | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.args = list(args) + (["--requirepass", password] if password else [])
        self.appendfsync = appendfsync
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=1,
                           socket_connect_timeout=1)

    def start(self, timeout_s: float = 30.0) -> float:
        """Start it (replaying the AOF); returns the monotonic time of its first answered PING."""
        with (self.directory / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.directory), "--appendonly", "yes",
                 "--appendfsync", self.appendfsync, "--save", "", "--maxmemory-policy", "noeviction",
                 *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        client = AofRedis.client(self)  # this class's probe, whatever a subclass's client is
        try:
            while True:
                try:
                    client.ping()
                    return time.monotonic()
                except (redis.RedisError, OSError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    log_text = (self.directory / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server did not start: {log_text[-2000:]}")
                time.sleep(POLL_S)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync (what the AOF holds is what survives)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill()
        self.proc = None


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(POLL_S)


def answers(make: Callable[[], redis.Redis], command: Callable[[redis.Redis], Any]) -> Any:
    """``command`` on a fresh client from ``make``, or None while that server does not answer."""
    client = make()
    try:
        return command(client)
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


def read_or_none(server: AofRedis, command: Callable[[redis.Redis], Any]) -> Any:
    """``command`` on a fresh connection, or None while Redis does not answer."""
    return answers(server.client, command)


def claim_seq(server: AofRedis, prefix: str) -> int | None:
    value = read_or_none(server, lambda c: c.get(f"{prefix}seq"))
    return None if value is None else int(value)


def terminal(server: AofRedis, prefix: str) -> int | None:
    counters = read_or_none(server, lambda c: c.hgetall(f"{prefix}n"))
    if counters is None:
        return None
    return sum(int(v) for k, v in counters.items()
               if k.decode().split(":")[0] in ("succeeded", "failed"))


def time_resume(server: AofRedis, prefix: str, answered_at: float,
                timeout_s: float = 120.0) -> float:
    """Seconds from ``answered_at`` (Redis answering again) to the worker's next claim."""
    before = claim_seq(server, prefix)
    wait_for(lambda: (claim_seq(server, prefix) or 0) > (before or 0), timeout_s,
             "the worker's next claim")
    return time.monotonic() - answered_at


def run(outages: list[float], intents: int, workdir: Path) -> dict[str, Any]:
    from ..producer import Producer
    from ..sandbox.server import SandboxServer
    from ..settings import Settings

    server = AofRedis(workdir / "redis")
    server.start()
    sandbox = SandboxServer(seed=1, latency_ms=50).start()
    prefix = "drill:"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPNS_", "REDIS_URL", "CELERY_"))}
    env.update(REDIS_URL=server.url, TPNS_REDIS_PREFIX=prefix, TPNS_BASE_URL=sandbox.url,
               TPNS_DATA_DIR=str(workdir / "data"), TPNS_LINGER_MS="50", TPNS_LEASE_S="5",
               TPNS_HTTP_TIMEOUT_S="1")
    log_path = workdir / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--concurrency",
                                   "2"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    producer = Producer(server.url, prefix,
                        settings=Settings.from_env({k: v for k, v in env.items()
                                                    if k.startswith(("TPNS_", "REDIS"))}))
    results: list[dict[str, Any]] = []
    try:
        ids = producer.submit_many([
            {"operator_type": 2, "token": f"tok-{k % 1000}", "account_list": [{"account": f"u{k}"}]}
            for k in range(intents)])
        total = sum(1 for i in ids if i)
        for n, down_s in enumerate(outages, 1):
            goal = total * n // (len(outages) + 2)

            def reached(goal: int = goal) -> bool:
                return (terminal(server, prefix) or 0) >= goal

            wait_for(reached, 300, "some progress")
            server.kill()
            time.sleep(down_s)  # the outage itself
            answered_at = server.start()
            resume_s = time_resume(server, prefix, answered_at)
            alive = worker.poll() is None
            results.append({"down_s": down_s, "resume_s": round(resume_s, 3), "alive": alive})
            click.echo(f"outage {down_s:g} s: next claim {resume_s:.2f} s after Redis answered; "
                       f"worker {'alive (same pid)' if alive else 'GONE'}")
            if not alive:
                break
        wait_for(lambda: (terminal(server, prefix) or 0) >= total, 600, "every intent terminal")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        producer.close()
        sandbox.stop()
        server.stop()
    return {"outages": results, "intents": total, "worker_exit": worker.returncode,
            "max_resume_s": max((r["resume_s"] for r in results), default=None),
            "log": str(log_path)}


@click.command()
@click.option("--outages", default="1,3,15", show_default=True,
              help="Outage lengths in seconds, comma-separated (one SIGKILL of Redis each).")
@click.option("--intents", type=click.IntRange(min=100), default=6000, show_default=True)
def main(outages: str, intents: int) -> None:
    """Kill Redis mid-drain and time how soon the worker claims again (see the module doc)."""
    lengths = [float(x) for x in outages.split(",") if x.strip()]
    with tempfile.TemporaryDirectory(prefix="tpns-drill-") as tmp:
        summary = run(lengths, intents, Path(tmp))
    summary.pop("log")
    click.echo(json.dumps(summary))
    if any(not r["alive"] for r in summary["outages"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
