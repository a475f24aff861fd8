"""Redis outages mid-drain (issue 11, SPEC §3.7): the worker rides them out in its own process.

A real ``redis-server`` with AOF (``appendfsync everysec``) on a free port, started by the test
(``worker.tools.drill.AofRedis``: the binary is found like the embedded Redis finds it), carries the
store AND the broker of one real ``tpns-batcher worker`` process draining a backlog of intents
with shared keys. The test SIGKILLs Redis mid-drain, keeps it down 1 s, 3 s and 15 s, and starts
it again on the same port and files. Then:

* every intent ends succeeded, the sandbox's bindings equal the sequential model and each key's
  applied sequence is its enqueue order (the checks of test_worker_e2e.py);
* the worker process was never restarted (same pid, alive all along) and claimed again after each
  restart (within a generous deadline: the resume TIME is measured by ``python -m worker.tools.drill``,
  never asserted here);
* one log line per outage, no traceback, no "Unrecoverable error";
* during the outage, ``health --worker --local`` passes (liveness never fails on Redis) while
  plain ``health`` fails;
* SIGTERM still ends the worker with status 0.

A worker whose consumer stops consuming while Redis answers and work waits is reported stuck in
its heartbeat file, rebuilt in the process, and (when that cannot help) exits with status 70.

A Sentinel failover mid-drain (the replica promoted, the old master gone) is held to the same
checks. ``TPNS_TEST_PROFILE=extended`` adds cycles and a 60 s outage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.polling import wait_until
from worker.embedded import redis_server_binary
from worker.liveness import heartbeat_dir, read_heartbeats
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings
from worker.tools.drill import AofRedis, answers, claim_seq, free_port, terminal
from worker.tools.stack import WorkerProcess

from .conftest import WORKER_COMMAND, Launcher, product_env
from .test_worker_e2e import (
    assert_all_succeeded,
    assert_per_key_order,
    assert_sandbox_matches_model,
    mixed_intents,
)

pytestmark = pytest.mark.e2e

EXTENDED = os.environ.get("TPNS_TEST_PROFILE") == "extended"
#: outage lengths in seconds, one SIGKILL of Redis each
OUTAGES = (1, 3, 15, 1, 60, 3, 15) if EXTENDED else (1, 3, 15)
N_INTENTS = 6000 if EXTENDED else 2000
#: progress after a restart is expected within seconds; this only catches a worker that never
#: comes back (the figure itself is the drill's)
RESUME_DEADLINE_S = 60.0


@pytest.fixture
def own_prefix() -> str:
    import uuid

    return f"tpnstest:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_producer(url: str, prefix: str) -> Producer:
    return Producer(url, prefix, settings=Settings.from_env(product_env(url, prefix)))


def close_producer(producer: Producer) -> None:
    app = getattr(getattr(producer, "_wake", None), "_app", None)
    if app is not None:
        app.close()
    producer.close()


def health(worker_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WORKER_COMMAND, "health", *args], env=worker_env, text=True,
                          capture_output=True, timeout=60)


def worker_env(launcher: Launcher, url: str, prefix: str, sandbox: SandboxServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPNS_", "REDIS_URL", "CELERY_"))}
    env.update(product_env(url, prefix, TPNS_BASE_URL=sandbox.url,
                           TPNS_DATA_DIR=str(launcher.tmp_path / "data")))
    return env


def drain_through_outages(server: Any, worker: WorkerProcess, prefix: str, n: int,
                          outages: tuple[float, ...], kill: Any, restart: Any,
                          during: Any = None, logged: bool = False) -> None:
    """For each outage: wait for some progress, ``kill()``, hold it down, ``restart()``, then
    require a claim and more terminal intents, from the very same worker process.

    With ``logged``, each outage also lasts until the worker has logged it, and the next one
    starts only once the worker has logged Redis answering again: so each outage is one the
    worker saw begin and end, whatever the machine's speed (a 1 s outage, or a short spell of
    Redis between two, could otherwise fall between two checks of a busy worker's watchdog)."""
    pid = worker.pid
    for k, down_s in enumerate(outages, 1):
        goal = n * k // (len(outages) + 2)
        wait_until(lambda g=goal: (terminal(server, prefix) or 0) >= g, 120,
                   message=f"{goal} intents terminal before outage {k}")
        kill()
        held_from = time.monotonic()
        if logged:
            wait_until(lambda k=k: worker.log().count("Redis unreachable (") >= k,
                       RESUME_DEADLINE_S, message=f"the worker logged outage {k}")
        if during is not None and down_s >= 15:
            during()
        left = down_s - (time.monotonic() - held_from)
        if left > 0:
            time.sleep(left)  # the outage itself (a scenario length, not a wait for a condition)
        restart()
        seq = claim_seq(server, prefix) or 0
        done = terminal(server, prefix) or 0
        wait_until(lambda s=seq: (claim_seq(server, prefix) or 0) > s, RESUME_DEADLINE_S,
                   message=f"a claim after outage {k} ({down_s} s)")
        wait_until(lambda d=done: (terminal(server, prefix) or 0) > d, RESUME_DEADLINE_S,
                   message=f"more intents terminal after outage {k} ({down_s} s)")
        if logged:
            wait_until(lambda k=k: worker.log().count("Redis answering again after") >= k,
                       RESUME_DEADLINE_S, message=f"the worker logged the end of outage {k}")
        assert worker.proc.poll() is None, f"the worker exited in outage {k}:\n{worker.log()[-3000:]}"
        assert worker.pid == pid


def assert_clean_log(worker: WorkerProcess, outages: int) -> None:
    log = worker.log()
    assert "Unrecoverable error" not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    assert log.count("Redis unreachable (") == outages, log.count("Redis unreachable (")
    assert log.count("Redis answering again after") == outages


def test_worker_rides_out_redis_kills_mid_drain(
        aof_redis: AofRedis, sandbox: SandboxServer, launcher: Launcher, own_prefix: str) -> None:
    sandbox.configure(latency_ms=30)
    intents = mixed_intents(N_INTENTS, tokens=300, accounts=300, seed=11)
    producer = make_producer(aof_redis.url, own_prefix)
    try:
        ids = producer.submit_many(intents)
        assert None not in ids
        worker = launcher.start(aof_redis.url, own_prefix, sandbox, name="outage")
        worker.wait_ready()
        env = worker_env(launcher, aof_redis.url, own_prefix, sandbox)

        def during() -> None:  # liveness from the local heartbeat: an outage is not death
            wait_until(lambda: "Redis unreachable" in worker.log(), 30,
                       message="the worker noticed the outage")
            # the heartbeat file carries the outage from the watchdog's next beat, a moment after
            # the log line: poll the local check until it reports it, and it must stay healthy
            def local_check_reports_it() -> bool:
                local = health(env, "--worker", "--local")
                assert local.returncode == 0, local.stdout + local.stderr
                return "Redis unreachable" in local.stdout
            wait_until(local_check_reports_it, 30, message="the local health check reports the outage")
            assert health(env).returncode == 1  # readiness: Redis is down

        drain_through_outages(aof_redis, worker, own_prefix, len(intents), OUTAGES,
                              kill=aof_redis.kill, restart=aof_redis.start, during=during,
                              logged=True)
        wait_until(lambda: (terminal(aof_redis, own_prefix) or 0) >= len(intents), 180,
                   message=lambda: f"all terminal; stats {producer.stats()['states']}")

        producer = _reopen(producer, aof_redis.url, own_prefix)
        assert_all_succeeded(producer, [i for i in ids if i])
        assert_sandbox_matches_model(sandbox, intents)
        assert_per_key_order(sandbox.applied(), intents)
        stats = producer.stats()
        assert stats["queue_depth"] == 0 and stats["in_flight"] == 0
        assert_clean_log(worker, len(OUTAGES))
        # the local heartbeat saw the consumer loop tick and the claims (prefork children too)
        (beat,) = read_heartbeats(heartbeat_dir(launcher.tmp_path / "data"))
        assert beat.pid == worker.pid and beat.store_up and beat.broker_up and not beat.stuck
        assert beat.loop_at > 0 and beat.progress_at > 0
        worker.terminate()
        assert worker.wait_exit(120) == 0  # 0 only when asked
    finally:
        close_producer(producer)


def _reopen(producer: Producer, url: str, prefix: str) -> Producer:
    """A fresh producer: the old one's pooled connections died with the server."""
    close_producer(producer)
    return make_producer(url, prefix)


def test_only_a_requested_stop_exits_zero(
        aof_redis: AofRedis, sandbox: SandboxServer, launcher: Launcher, own_prefix: str) -> None:
    # Celery's cold shutdown (SIGQUIT) stops the worker with status 1; app.worker_main() used to
    # drop it, and every unplanned stop (an "Unrecoverable error" too) exited 0
    worker = launcher.start(aof_redis.url, own_prefix, sandbox, name="quit")
    worker.wait_ready()
    worker.proc.send_signal(signal.SIGQUIT)
    assert worker.wait_exit(60) != 0
    polite = launcher.start(aof_redis.url, own_prefix, sandbox, name="term")
    polite.wait_ready()
    polite.terminate()
    assert polite.wait_exit(60) == 0


def test_a_stuck_worker_is_reported_then_exits_non_zero_as_a_last_resort(
        aof_redis: AofRedis, sandbox: SandboxServer, launcher: Launcher, own_prefix: str) -> None:
    from worker.celery_app import make_celery

    worker = launcher.start(aof_redis.url, own_prefix, sandbox, name="stuck",
                            TPNS_WORKER_STUCK_S="5")
    worker.wait_ready()
    settings = Settings.from_env(product_env(aof_redis.url, own_prefix))
    control = make_celery(settings, aof_redis.url)
    producer = make_producer(aof_redis.url, own_prefix)
    try:
        # a live event loop that no longer consumes: Redis answers, work waits, nothing moves
        replies = control.control.cancel_consumer(f"{own_prefix}flush", reply=True, timeout=10)
        assert replies, "the worker did not answer the remote control"
        ids = producer.submit_many([{"operator_type": 4, "token": f"tok-{k}"} for k in range(30)])
        assert None not in ids
        beat_file = heartbeat_dir(launcher.tmp_path / "data") / f"{worker.pid}.json"

        def stuck() -> str:
            try:
                return str(json.loads(beat_file.read_text())["stuck"])
            except (OSError, ValueError):
                return ""

        reason = wait_until(stuck, 60, message="the heartbeat file says stuck")
        assert "no task received and no batch claimed" in reason
        # the rebuild cannot help here (the queue was cancelled), so the last resort follows
        assert worker.wait_exit(60) == 70
        log = worker.log()
        assert "rebuilding its consumer" in log and "exiting with status 70" in log
    finally:
        control.close()
        close_producer(producer)


# -- Sentinel failover -------------------------------------------------------------------------------

MASTER = "outagemaster"


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=log.parent)


def _answers(port: int, command: Any) -> Any:
    return answers(lambda: redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1,
                                       decode_responses=True), command)


class _Role:
    """Duck-typed like ``AofRedis`` for ``claim_seq``/``terminal``: reads whoever is master."""

    def __init__(self, sentinel_port: int) -> None:
        self.sentinel_port = sentinel_port

    def client(self) -> redis.Redis:
        addr = _answers(self.sentinel_port, lambda c: c.sentinel_get_master_addr_by_name(MASTER))
        port = int(addr[1]) if addr else 1
        return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)


def test_worker_rides_out_a_sentinel_failover_mid_drain(
        tmp_path: Path, sandbox: SandboxServer, launcher: Launcher, own_prefix: str) -> None:
    binary = redis_server_binary()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports: set[int] = set()
        while len(ports) < 3:  # three distinct ones (a port freed a moment ago may come back)
            ports.add(free_port())
        master_port, replica_port, sentinel_port = sorted(ports)
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                  "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
        for name, port, extra in (("master", master_port, []),
                                  ("replica", replica_port,
                                   ["--replicaof", "127.0.0.1", str(master_port)])):
            directory = tmp_path / name
            directory.mkdir()
            procs.append(_start([binary, "--port", str(port), "--dir", str(directory), *common,
                                 *extra], directory / "redis.log"))
        master_proc = procs[0]
        wait_until(lambda: _answers(replica_port, lambda c: c.info("replication")
                                    .get("master_link_status") == "up"), 30,
                   message="the replica in sync")
        sentinel_dir = tmp_path / "sentinel"
        sentinel_dir.mkdir()
        conf = sentinel_dir / "sentinel.conf"
        conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nprotected-mode no\n"
                        f"dir {sentinel_dir}\nsentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n"
                        f"sentinel down-after-milliseconds {MASTER} 1000\n"
                        f"sentinel failover-timeout {MASTER} 5000\n")
        sentinel = _start([binary, str(conf), "--sentinel"], sentinel_dir / "sentinel.log")
        procs.append(sentinel)
        wait_until(lambda: sentinel.poll() is not None or _answers(
            sentinel_port, lambda c: c.sentinel_get_master_addr_by_name(MASTER)), 30,
            message="the Sentinel names the master")
        assert sentinel.poll() is None, (sentinel_dir / "sentinel.log").read_text(errors="replace")
        wait_until(lambda: _answers(sentinel_port, lambda c: c.sentinel_slaves(MASTER)), 20,
                   message="the Sentinel knows the replica")

        url = f"sentinel://127.0.0.1:{sentinel_port}/{MASTER}/0"
        sandbox.configure(latency_ms=30)
        intents = mixed_intents(1500, tokens=200, accounts=200, seed=12)
        producer = make_producer(url, own_prefix)
        try:
            ids = producer.submit_many(intents)
            assert None not in ids
        finally:
            close_producer(producer)
        worker = launcher.start(url, own_prefix, sandbox, name="failover")
        worker.wait_ready()
        role = _Role(sentinel_port)

        def fail_over() -> None:
            master_proc.kill()  # the old master is gone for good: the replica must take over
            master_proc.wait(timeout=30)

        def promoted() -> None:
            wait_until(lambda: (_answers(sentinel_port, lambda c: c.sentinel_get_master_addr_by_name(
                MASTER)) or ("", 0))[1] in (replica_port, str(replica_port)), 60,
                message="the Sentinel promoted the replica")

        drain_through_outages(role, worker, own_prefix, len(intents), (0,), kill=fail_over,
                              restart=promoted)
        wait_until(lambda: (terminal(role, own_prefix) or 0) >= len(intents), 180,
                   message="all terminal after the failover")
        producer = make_producer(url, own_prefix)
        try:
            assert_all_succeeded(producer, [i for i in ids if i])
        finally:
            close_producer(producer)
        # a write the replica had not received when the master died may be lost (a claim, an
        # outcome): the lease check and the reaper turn that into a resend, never a reorder
        assert_sandbox_matches_model(sandbox, intents)
        assert_per_key_order(sandbox.applied(), intents)
        assert worker.proc.poll() is None
        assert "Unrecoverable error" not in worker.log()
        worker.terminate()
        assert worker.wait_exit(120) == 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
