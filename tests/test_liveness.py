"""The stuck rule, the heartbeat files, ``health --worker --local`` and sd_notify (worker/liveness.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.liveness import (
    Heartbeat,
    heartbeat_dir,
    judge_local,
    read_heartbeats,
    sd_notify,
    stuck_reason,
    write_heartbeat,
)
from worker.tools.drill import free_port

STUCK_S = 60.0


def rule(**overrides: object) -> str:
    args: dict[str, object] = dict(now=1000.0, store_up=True, broker_up=True, up_since=0.0,
                                   loop_at=999.0, progress_at=999.0, work_waiting=True,
                                   stuck_s=STUCK_S)
    args.update(overrides)
    return stuck_reason(**args)  # type: ignore[arg-type]


def test_a_busy_worker_is_not_stuck() -> None:
    assert rule() == ""


def test_a_silent_event_loop_is_stuck_while_redis_answers() -> None:
    assert "event loop has not run for 100 s" in rule(loop_at=900.0)


def test_no_progress_while_work_waits_is_stuck() -> None:
    assert "no task received and no batch claimed for 100 s" in rule(progress_at=900.0)


def test_no_progress_without_work_is_idle_not_stuck() -> None:
    assert rule(progress_at=0.0, work_waiting=False) == ""


@pytest.mark.parametrize("down", ["store_up", "broker_up"])
def test_an_outage_is_never_stuck(down: str) -> None:
    assert rule(loop_at=0.0, progress_at=0.0, **{down: False}) == ""


def test_silence_from_before_redis_came_back_does_not_count() -> None:
    # Redis answered again 10 s ago: the loop and the claims get their full stuck_s from then
    assert rule(loop_at=0.0, progress_at=0.0, up_since=990.0) == ""
    assert rule(loop_at=0.0, progress_at=0.0, up_since=900.0) != ""


def beat(**overrides: object) -> Heartbeat:
    base = Heartbeat(pid=os.getpid(), name="host:1", written_at=1000.0, loop_at=999.0,
                     progress_at=999.0, store_up=True, broker_up=True, work_waiting=False)
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_heartbeats_round_trip_and_files_of_dead_processes_are_dropped(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_heartbeat(tmp_path, beat())
    write_heartbeat(tmp_path, beat(pid=gone.pid))
    assert read_heartbeats(tmp_path) == [beat()]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{os.getpid()}.json"]


def test_judging_the_local_workers() -> None:
    assert judge_local([], 1000.0) == (False, "no worker process on this host has written a "
                                              "heartbeat")
    assert judge_local([beat()], 1000.0) == (True, "1 worker process(es) on this host alive")
    healthy, reason = judge_local([beat(store_up=False)], 1000.0)
    assert healthy and "Redis unreachable (store): waiting for it" in reason
    healthy, reason = judge_local([beat(written_at=900.0)], 1000.0)
    assert not healthy and "heartbeat 100 s old" in reason
    healthy, reason = judge_local([beat(), beat(pid=1, stuck="no progress")], 1000.0)
    assert not healthy and "pid 1 is stuck: no progress" in reason


def _health_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    # Redis is a port nobody listens on: --local must not care
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("TPNS_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["health", "--worker", "--local"])
    return result.exit_code, result.stdout.strip()


def test_health_local_reads_the_heartbeat_file_and_never_redis(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.liveness import now

    assert _health_local(tmp_path, monkeypatch) == (
        1, "unhealthy: no worker process on this host has written a heartbeat")
    write_heartbeat(heartbeat_dir(tmp_path), beat(written_at=now(), store_up=False,
                                                  broker_up=False))
    assert _health_local(tmp_path, monkeypatch) == (
        0, "ok: 1 worker process(es) on this host alive; Redis unreachable (broker, store): "
           "waiting for it")
    write_heartbeat(heartbeat_dir(tmp_path), beat(written_at=now(), stuck="the loop is silent"))
    code, text = _health_local(tmp_path, monkeypatch)
    assert code == 1 and text.endswith("is stuck: the loop is silent")


def test_sd_notify_sends_one_datagram_to_the_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        assert sd_notify("READY=1\nSTATUS=running", {"NOTIFY_SOCKET": str(path)})
        assert listener.recv(256) == b"READY=1\nSTATUS=running"
    abstract = f"tpns-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + abstract)
        listener.settimeout(5)
        assert sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + abstract})
        assert listener.recv(256) == b"WATCHDOG=1"
    assert not sd_notify("WATCHDOG=1", {})  # not under systemd: nothing to do
    assert not sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})
