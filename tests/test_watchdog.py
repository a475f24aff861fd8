"""The watchdog (worker/watchdog.py): one line per outage, the stuck rule acted on, the heartbeat.

Rounds are driven one by one with a fake clock and probes that fail on demand (seams of our own);
the probes themselves are checked against a real Redis and a port nobody listens on.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import redis

from worker.liveness import read_heartbeats
from worker.tools.drill import free_port
from worker.watchdog import Progress, Watchdog, broker_probe, consumer_tick, redis_probe

STUCK_S = 60.0


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.now = 1000.0
        self.down: set[str] = set()
        self.work = False
        self.notified: list[str] = []
        self.gave_up: list[str] = []
        self.progress = Progress()
        self.rebuild = threading.Event()
        self.dir = tmp_path / "workers"
        self.watchdog = Watchdog(
            name="host:1", store_url="redis://:hunter2@10.0.0.1:6379/0",
            broker_url="sentinel://s1:26379/mymaster/0?sentinel_password=hunter3",
            store_probe=self._probe("store"), broker_probe=self._probe("broker"),
            work_waiting=lambda: self.work, heartbeat_dir=self.dir, stuck_s=STUCK_S,
            progress=self.progress, rebuild=self.rebuild, clock=lambda: self.now,
            notify=self._notify, give_up=self.gave_up.append)

    def _probe(self, part: str):  # type: ignore[no-untyped-def]
        def probe() -> None:
            if part in self.down:
                raise redis.ConnectionError("Error 111 connecting to 10.0.0.1:6379. Connection refused.")
        return probe

    def _notify(self, message: str) -> bool:
        self.notified.append(message)
        return True

    def step(self, advance: float = 0.5) -> None:
        self.now += advance
        self.watchdog.step()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "worker.watchdog"]


def test_one_line_when_an_outage_starts_and_one_when_it_ends(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rig.progress.loop_ticked(rig.now)
    rig.step()
    rig.down = {"store", "broker"}
    for _ in range(20):  # 10 s of outage
        rig.step()
    rig.down = set()
    rig.step()
    rig.step()
    lines = messages(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("Redis unreachable (store at redis://:***@10.0.0.1:6379/0: "
                               "ConnectionError: Error 111")
    assert "broker at sentinel://s1:26379/mymaster/0: ConnectionError" in lines[0]
    assert "hunter" not in lines[0]  # no password, not even the Sentinel's in the query
    assert lines[1] == "Redis answering again after a 10.0 s outage; flushing resumes"
    # systemd: started once, pinged on every round (an outage is not a reason to restart)
    assert rig.notified.count("READY=1\nSTATUS=running") == 1
    assert rig.notified.count("WATCHDOG=1") == 23
    assert not rig.rebuild.is_set() and not rig.gave_up


def test_the_heartbeat_file_tells_what_the_watchdog_saw(rig: Rig) -> None:
    rig.progress.loop_ticked(990.0)
    rig.progress.progressed(995.0)
    rig.down = {"broker"}
    rig.step()
    (beat,) = read_heartbeats(rig.dir)
    assert (beat.written_at, beat.loop_at, beat.progress_at) == (1000.5, 990.0, 995.0)
    assert (beat.store_up, beat.broker_up, beat.stuck) == (True, False, "")
    assert json.loads((rig.dir / f"{beat.pid}.json").read_text())["name"] == "host:1"


def test_a_stuck_worker_is_rebuilt_first_and_exits_only_if_that_fails(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.work = True
    rig.progress.loop_ticked(rig.now)
    rig.progress.progressed(rig.now)
    rig.step()
    for _ in range(10):  # the loop ticks, nothing is received or claimed while work waits
        rig.progress.loop_ticked(rig.now)
        rig.step(advance=6.0)
    assert rig.rebuild.is_set()
    (beat,) = read_heartbeats(rig.dir)
    assert "no task received and no batch claimed" in beat.stuck
    pings = rig.notified.count("WATCHDOG=1")
    rig.step()
    assert rig.notified.count("WATCHDOG=1") == pings  # systemd's watchdog starves
    assert any(m.startswith("worker stuck: no task received") for m in messages(caplog))
    assert not rig.gave_up
    for _ in range(11):  # still nothing after the rebuild
        rig.progress.loop_ticked(rig.now)
        rig.step(advance=6.0)
    assert rig.gave_up and "no task received" in rig.gave_up[0]


def test_progress_after_the_rebuild_clears_the_verdict(rig: Rig) -> None:
    rig.work = True
    rig.progress.loop_ticked(rig.now)
    rig.step(advance=STUCK_S + 5)
    rig.progress.loop_ticked(rig.now)
    rig.step()
    assert rig.rebuild.is_set()
    rig.progress.progressed(rig.now)
    rig.step()
    (beat,) = read_heartbeats(rig.dir)
    assert beat.stuck == "" and rig.notified[-1] == "WATCHDOG=1"
    rig.step(advance=STUCK_S - 1)
    assert not rig.gave_up


def test_a_long_outage_is_not_stuck(rig: Rig) -> None:
    rig.work = True
    rig.step()
    rig.down = {"store"}
    rig.step(advance=10 * STUCK_S)
    rig.down = set()
    rig.step()  # Redis is back: the silence before now does not count
    assert not rig.rebuild.is_set()
    assert read_heartbeats(rig.dir)[0].stuck == ""


def test_the_consumer_tick_notes_the_loop_and_raises_when_asked_to_rebuild() -> None:
    progress, rebuild = Progress(), threading.Event()
    tick = consumer_tick(progress, rebuild)
    tick()
    assert progress.loop_at > 0
    rebuild.set()
    with pytest.raises(ConnectionResetError, match="rebuilding a stuck consumer"):
        tick()
    assert not rebuild.is_set()
    tick()  # once


def test_probes_against_a_real_redis_and_a_closed_port(redis_url: str) -> None:
    redis_probe(redis_url)()
    broker_probe(redis_url)()
    closed = free_port()
    with pytest.raises(redis.ConnectionError):
        redis_probe(f"redis://127.0.0.1:{closed}/0")()
    with pytest.raises(OSError):
        broker_probe(f"amqp://guest:guest@127.0.0.1:{closed}//")()


def test_the_store_probe_writes_so_a_redis_that_cannot_write_counts_as_down(
        tmp_path: Path) -> None:
    from worker.embedded import start_private
    from worker.store import unavailable

    proc, url = start_private(tmp_path / "redis")  # a server of our own, to demote
    try:
        client = redis.Redis.from_url(url)
        client.replicaof("127.0.0.1", str(free_port()))  # a replica of nobody: read-only
        client.close()
        redis_probe(url)()  # it still answers a PING
        with pytest.raises(redis.ResponseError) as caught:
            redis_probe(url, "tpnstest:probe")()
        assert unavailable(caught.value)
    finally:
        proc.kill()
        proc.wait(timeout=10)
