"""The embedded Redis comes back by itself (issue 11, item 2).

With no ``REDIS_URL`` the commands share one daemonized ``redis-server`` under ``TPNS_DATA_DIR``.
Here it is SIGKILLed for real, and then: the next command starts it again from its append-only
file; many commands (or processes) racing after a kill start exactly one; a running ``worker`` or
``serve`` starts it again with no command at all; a server that is alive but not answering, or
whose socket is gone, is never doubled on its AOF.

Servers are counted from ``/proc``, not from the pid file: a process whose working directory is
the data directory (the server's ``--dir``) and whose name is ``redis-server``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.polling import wait_until
from worker.embedded import EmbeddedGuard, ensure_embedded, stop_embedded
from worker.errors import ConfigError
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings
from worker.tools.drill import free_port

from .conftest import _PRODUCT_VARS, WORKER_COMMAND, Launcher, product_env
from .test_worker_e2e import (
    assert_per_key_order,
    assert_sandbox_matches_model,
    contended_intents,
    mixed_intents,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").exists(),
                                reason="counts server processes through /proc (Linux)")

PREFIX = "tpnstest:embedded:"
STARTED = re.compile(r"Redis is starting")


# -- helpers --------------------------------------------------------------------------------------

def server_pids(data_dir: Path) -> list[int]:
    """Live ``redis-server`` processes running in ``data_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != data_dir:
                continue
            name = (entry / "comm").read_text().strip()
        except OSError:  # gone, a zombie, or not ours
            continue
        if name.startswith("redis-server"):
            found.append(int(entry.name))
    return sorted(found)


def the_server(data_dir: Path) -> int:
    pids = server_pids(data_dir)
    assert len(pids) == 1, f"expected one server in {data_dir}, found {pids}"
    return pids[0]


def starts(data_dir: Path) -> int:
    """How many servers were started in ``data_dir`` (each logs this line first)."""
    return len(STARTED.findall((data_dir / "redis.log").read_text(errors="replace")))


def answering(data_dir: Path) -> bool:
    try:
        client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def aof_written(data_dir: Path) -> bool:
    """Whether every write the server acknowledged is in its AOF file (in the kernel's cache,
    which a kill of the process does not lose). With ``appendfsync everysec`` Redis postpones
    that write, for up to 2 s while answering, when the previous fsync is slow (a busy disk):
    a kill then would lose acknowledged writes, which is the stated bound, not what is tested."""
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"), socket_timeout=5)
    try:
        return client.info("persistence")["aof_buffer_length"] == 0
    finally:
        client.close()


def kill_server(data_dir: Path) -> int:
    """SIGKILL the one server of ``data_dir`` once its AOF holds every acknowledged write, and
    wait until it is gone; returns its pid."""
    pid = the_server(data_dir)
    wait_until(functools.partial(aof_written, data_dir), 30, interval_s=0.01,
               message="the AOF holds every acknowledged write")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid not in server_pids(data_dir), 30, message=f"server {pid} gone")
    return pid


def restarted_after(data_dir: Path, old_pid: int) -> int | None:
    """The new server's pid once one answers that is not ``old_pid``."""
    pids = server_pids(data_dir)
    return pids[0] if pids and old_pid not in pids and answering(data_dir) else None


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PRODUCT_VARS)}
    env.update(TPNS_DATA_DIR=str(data_dir), TPNS_REDIS_PREFIX=PREFIX)
    return env


def cli(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([WORKER_COMMAND, *args], env=cli_env(data_dir), input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=data_dir.parent)


def intents_jsonl(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"operator_type": 2, "token": f"tok-{k}",
                               "account_list": [{"account": f"u{k}"}]}) + "\n"
                   for k in range(start, start + n))


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A short private TPNS_DATA_DIR (a unix socket path holds about 100 bytes); every server
    left in it is stopped afterwards."""
    base = Path(tempfile.mkdtemp(prefix="tpe-")).resolve()
    path = base / "d"
    try:
        yield path
    finally:
        for pid in server_pids(path):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        try:
            stop_embedded(path)
        except OSError:
            pass
        for pid in server_pids(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)


# -- the next command -----------------------------------------------------------------------------

def test_the_next_status_command_starts_a_killed_server_again_and_the_intents_are_there(
        data_dir: Path) -> None:
    enqueued = cli(data_dir, "enqueue", "-", stdin=intents_jsonl(50))
    assert enqueued.returncode == 0, enqueued.stderr
    ids = enqueued.stdout.split()
    assert len(ids) == 50
    old = kill_server(data_dir)
    assert (data_dir / "redis.sock").exists() and (data_dir / "redis.pid").exists()  # stale

    result = cli(data_dir, "status", *ids)

    assert result.returncode == 0, result.stderr
    statuses = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["id"] for s in statuses] == ids
    assert {s["state"] for s in statuses} == {"queued"}
    assert [s["token"] for s in statuses] == [f"tok-{k}" for k in range(50)]
    new = the_server(data_dir)
    assert new != old
    assert (data_dir / "redis.pid").read_text().strip() == str(new)
    assert starts(data_dir) == 2


def test_commands_started_together_after_a_kill_start_exactly_one_server(data_dir: Path) -> None:
    enqueued = cli(data_dir, "enqueue", "-", stdin=intents_jsonl(20))
    assert enqueued.returncode == 0, enqueued.stderr
    ids = enqueued.stdout.split()
    kill_server(data_dir)
    commands = [("status", ids[0]), ("status", *ids), ("stats", "--json"), ("health",),
                ("enqueue", "-")]
    procs = [subprocess.Popen([WORKER_COMMAND, *args], env=cli_env(data_dir),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=data_dir.parent)
             for args in commands]
    outputs = [p.communicate(intents_jsonl(1, 100), timeout=120) for p in procs]

    for args, proc, (_, err) in zip(commands, procs, outputs, strict=True):
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}: {err}"
    assert starts(data_dir) == 2
    the_server(data_dir)
    assert [json.loads(line)["state"] for line in outputs[1][0].splitlines()] == ["queued"] * 20
    assert json.loads(outputs[2][0])["states"]["queued"] >= 20
    assert outputs[3][0].startswith("ok: redis reachable")
    final = cli(data_dir, "status", *ids, outputs[4][0].strip())
    assert final.returncode == 0, final.stderr
    assert len(final.stdout.splitlines()) == 21


_RACER = """
import sys, time
from pathlib import Path
from worker.embedded import ensure_embedded
data, go, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.002)
print(ensure_embedded(data, timeout_s=60))
"""


def all_ready(gate: Path, racers: int) -> bool:
    return len(list(gate.glob("ready*"))) == racers


def test_processes_racing_on_a_dead_server_start_one_and_all_find_it(data_dir: Path) -> None:
    ensure_embedded(data_dir)
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"))
    client.set(f"{PREFIX}kept", "yes")
    client.close()
    racers = 5
    for round_ in range(2):
        kill_server(data_dir)
        before = starts(data_dir)
        gate = data_dir.parent / f"round{round_}"
        gate.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(data_dir), str(gate / "go"),
                                   str(gate / f"ready{k}")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for k in range(racers)]
        wait_until(functools.partial(all_ready, gate, racers), 60, message="every racer ready")
        (gate / "go").touch()
        outputs = [p.communicate(timeout=120) for p in procs]

        assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
        assert {out.strip() for out, _ in outputs} == {f"unix://{data_dir / 'redis.sock'}"}
        assert starts(data_dir) == before + 1
        the_server(data_dir)
        client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"))
        assert client.get(f"{PREFIX}kept") == b"yes"
        client.close()


# -- never a second server on the same AOF --------------------------------------------------------

def test_a_server_that_listens_but_does_not_answer_is_waited_for_never_doubled(
        data_dir: Path) -> None:
    ensure_embedded(data_dir)
    pid = the_server(data_dir)
    os.kill(pid, signal.SIGSTOP)  # alive, socket open, no answer: like a server stuck in a fork
    try:
        with pytest.raises(ConfigError, match=rf"runs \(pid {pid}\) but does not answer"):
            ensure_embedded(data_dir, timeout_s=1.5)
        assert EmbeddedGuard(data_dir).check() is False
        assert server_pids(data_dir) == [pid] and starts(data_dir) == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    ensure_embedded(data_dir)
    assert server_pids(data_dir) == [pid]


def test_a_live_server_whose_socket_was_removed_is_not_doubled(data_dir: Path) -> None:
    ensure_embedded(data_dir)
    pid = the_server(data_dir)
    (data_dir / "redis.sock").unlink()

    with pytest.raises(ConfigError, match=rf"runs \(pid {pid}\) but does not answer"):
        ensure_embedded(data_dir, timeout_s=1)

    assert server_pids(data_dir) == [pid] and starts(data_dir) == 1


def test_a_stale_pid_file_naming_another_live_process_does_not_block_a_start(
        data_dir: Path) -> None:
    ensure_embedded(data_dir)
    kill_server(data_dir)
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE, cwd=data_dir.parent) as other:
        try:
            (data_dir / "redis.pid").write_text(f"{other.pid}\n")  # the pid was reused elsewhere
            ensure_embedded(data_dir)
            assert answering(data_dir) and starts(data_dir) == 2
            assert (data_dir / "redis.pid").read_text().strip() == str(the_server(data_dir))
        finally:
            other.kill()


# -- long-running processes start it again by themselves ------------------------------------------

def test_the_guard_starts_a_killed_server_again_by_itself_with_its_data(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ensure_embedded(data_dir)
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"))
    client.set(f"{PREFIX}kept", "yes")
    client.close()
    guard = EmbeddedGuard(data_dir, interval_s=0.05).start()
    try:
        with caplog.at_level(logging.INFO, logger="worker.embedded"):
            for _ in range(2):
                old = kill_server(data_dir)
                wait_until(functools.partial(restarted_after, data_dir, old), 60,
                           message="the guard started the server again")
    finally:
        guard.stop()
    client = redis.Redis(unix_socket_path=str(data_dir / "redis.sock"))
    assert client.get(f"{PREFIX}kept") == b"yes"
    client.close()
    the_server(data_dir)
    assert starts(data_dir) == 3
    # one line per restart; a server killed again before its starter saw it answer is started
    # again within the same call, under one line
    restarts = [r for r in caplog.records if "started it again" in r.getMessage()]
    assert 1 <= len(restarts) <= 2 and all(r.levelno == logging.WARNING for r in restarts)


def test_a_running_serve_starts_its_killed_server_again(data_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([WORKER_COMMAND, "serve", "--port", str(free_port())],
                                env=cli_env(data_dir), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=data_dir.parent)
    try:
        wait_until(lambda: "Uvicorn running" in log_path.read_text() or proc.poll() is not None,
                   60, message="serve listening")
        assert proc.poll() is None, log_path.read_text()
        old = kill_server(data_dir)
        wait_until(lambda: restarted_after(data_dir, old), 60,
                   message=lambda: f"serve started the server again; log:\n{log_path.read_text()}")
        # the guard writes its line once its start call returns, after the server answers
        wait_until(lambda: "started it again" in log_path.read_text(), 60,
                   message=lambda: f"serve's line about the restart; log:\n{log_path.read_text()}")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _progress(producer: Producer) -> tuple[int, int]:
    """(terminal intents, items in flight); (-1, -1) while the store does not answer."""
    try:
        counters = producer.store.counters()
        in_flight = producer.stats()["in_flight"]
    except (redis.RedisError, OSError):
        return -1, -1
    done = sum(counters.get(f"{state}:{op}", 0) for state in ("succeeded", "failed")
               for op in range(1, 6))
    return done, in_flight


@pytest.mark.e2e
@pytest.mark.timeout(400)  # ~30 s when it passes; the waits below name what never happened
def test_a_running_worker_starts_its_killed_embedded_redis_again_and_the_drain_completes(
        data_dir: Path, sandbox: SandboxServer, launcher: Launcher) -> None:
    sandbox.configure(latency_ms=150)
    intents = mixed_intents(400, tokens=150, accounts=150, seed=21) + \
        contended_intents(200, tokens=10, accounts=6, seed=22)
    settings = Settings.from_env(product_env(None, PREFIX, TPNS_DATA_DIR=str(data_dir)))
    producer = Producer(settings=settings)  # starts the embedded Redis
    try:
        ids = producer.submit_many(intents)
        assert all(ids)
        worker = launcher.start(None, PREFIX, sandbox, TPNS_DATA_DIR=str(data_dir))
        worker.wait_ready()
        for done_before_kill in (100, 300):
            def under_way(n: int = done_before_kill) -> bool:
                done, in_flight = _progress(producer)
                return (done >= n and in_flight > 0) or worker.proc.poll() is not None
            wait_until(under_way, 120, message=lambda: f"progress: {_progress(producer)}")
            assert worker.proc.poll() is None, f"the worker exited ({worker.proc.returncode})"
            old = kill_server(data_dir)
            # no command runs meanwhile: only the worker's guard can start it
            wait_until(functools.partial(restarted_after, data_dir, old), 60,
                       message=lambda: f"the worker started the server again; log:\n"
                                       f"{worker.log()[-3000:]}")
        wait_until(lambda: _progress(producer) == (len(intents), 0)
                   or worker.proc.poll() is not None, 180,
                   message=lambda: f"all {len(intents)} terminal: {_progress(producer)}")

        assert worker.proc.poll() is None, f"the worker exited ({worker.proc.returncode})"
        assert worker.log().count("started it again") == 2
        assert starts(data_dir) == 3
        the_server(data_dir)
        statuses = producer.statuses([i for i in ids if i is not None])
        assert {s.state for s in statuses if s is not None} == {"succeeded"}
        assert sum(s is not None for s in statuses) == len(intents)
        assert_sandbox_matches_model(sandbox, intents)
        assert_per_key_order(sandbox.applied(), intents)
    finally:
        producer.close()
