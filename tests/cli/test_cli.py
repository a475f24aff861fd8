"""The CLI when Redis cannot answer (SPEC §3.7, §8): exit 3 with one line, never a traceback;
``enqueue`` still prints the stored ids and names the lines in doubt and those not stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from tests.support.redis_faults import RedisProcess, ReplyLosingRelay, private_redis
from worker.cli import main

PASSWORD = "pw-for-the-cli-test"
COMMAND = str(Path(sys.executable).with_name("tpns-batcher"))
LINES = [json.dumps({"operator_type": 4, "token": f"tok-{k}", "id": f"line-{k}"}) for k in range(3)]


@pytest.fixture
def dead_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis (with a password) that was killed: its port refuses connections."""
    with private_redis(tmp_path / "redis", password=PASSWORD) as server:
        server.kill()
        yield server


def run(args: list[str], url: str, tmp_path: Path, stdin: str = "",
        **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TPNS_", "REDIS_", "CELERY_"))}
    clean.update({"REDIS_URL": url, "TPNS_REDIS_PREFIX": "tpnstest:cli:", **env})
    return subprocess.run([COMMAND, *args], input=stdin, capture_output=True, text=True,
                          env=clean, cwd=tmp_path, timeout=60)


def check_one_line(code: int, stdout: str, stderr: str) -> None:
    assert code == 3, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: Redis at redis://:***@127.0.0.1:")
    assert "unavailable: ConnectionError" in lines[0]
    assert PASSWORD not in stderr


def test_status_exits_3_with_one_line_and_no_traceback(dead_redis: RedisProcess,
                                                       tmp_path: Path) -> None:
    done = run(["status", "line-0"], dead_redis.url, tmp_path)  # a real process
    check_one_line(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("args", [["wait", "line-0", "--timeout", "1"], ["stats"],
                                  ["stats", "--json"], ["requeue-failed"]])
def test_every_other_reading_command_exits_3_with_one_line(
        dead_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setenv("REDIS_URL", dead_redis.url)
    monkeypatch.delenv("TPNS_CONFIG_FILE", raising=False)
    done = CliRunner().invoke(main, args, catch_exceptions=False)
    check_one_line(done.exit_code, done.stdout, done.stderr)


def test_enqueue_exits_3_and_names_every_line_not_stored(dead_redis: RedisProcess,
                                                         tmp_path: Path) -> None:
    done = run(["enqueue", "-"], dead_redis.url, tmp_path,
               stdin="\n".join([LINES[0], "", "{bad json", LINES[2]]) + "\n")
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == "line 1: not stored (store_unavailable): safe to send again"
    assert lines[1].startswith("line 3: json: ")  # refused by the input rules, as always
    assert lines[2] == "line 4: not stored (store_unavailable): safe to send again"
    assert lines[3] == "lines after 4: not read, not sent"
    assert lines[4].startswith("error: Redis at redis://:***@") and len(lines) == 5
    assert "Traceback" not in done.stderr and PASSWORD not in done.stderr


def test_enqueue_names_the_lines_in_doubt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with private_redis(tmp_path / "redis") as server, ReplyLosingRelay(server.port) as relay:
        relay.losing = False
        monkeypatch.setenv("REDIS_URL", relay.url)
        monkeypatch.setenv("TPNS_REDIS_PREFIX", "tpnstest:cli:")
        monkeypatch.delenv("TPNS_CONFIG_FILE", raising=False)
        monkeypatch.setattr("worker.producer.Producer._send_wakes", lambda self, wakes: None)
        assert CliRunner().invoke(main, ["enqueue", "-"], input=LINES[0]).exit_code == 0
        relay.losing = True
        done = CliRunner().invoke(main, ["enqueue", "-"], input="\n".join(LINES[1:]) + "\n",
                                  catch_exceptions=False)
        assert done.exit_code == 3
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert lines[0].startswith("line 1: in doubt (id line-1): sent, not acknowledged; look it up")
        assert lines[1].startswith("line 2: in doubt (id line-2)")
        assert lines[2] == "lines after 2: not read, not sent"
        assert lines[3].startswith("error: Redis at ") and "(0 stored, 0 not stored, 2 in doubt)" in lines[3]
        # looked up afterwards, directly: the reply was lost, the intents are there
        assert server.client().exists("tpnstest:cli:i:line-1", "tpnstest:cli:i:line-2") == 2
        for key in server.client().scan_iter(match="tpnstest:cli:*"):
            server.client().delete(key)


def test_enqueue_prints_the_stored_ids_and_exits_3_on_queue_full(
        redis_url: str, prefix: str, rconn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("TPNS_REDIS_PREFIX", prefix)
    monkeypatch.setenv("TPNS_MAX_PENDING", "3")
    monkeypatch.delenv("TPNS_CONFIG_FILE", raising=False)
    monkeypatch.setattr("worker.producer.Producer._send_wakes", lambda self, wakes: None)
    monkeypatch.setattr("worker.cli.intents.ENQUEUE_BATCH", 2)
    lines = [json.dumps({"operator_type": 4, "token": f"t{k}", "id": f"q-{k}"}) for k in range(1, 6)]
    done = CliRunner().invoke(main, ["enqueue", "-"], input="\n".join(lines) + "\n",
                              catch_exceptions=False)
    assert done.exit_code == 3
    assert done.stdout.split() == ["q-1", "q-2", "q-3"]
    assert done.stderr.splitlines()[:2] == ["line 4: not stored (queue_full): safe to send again",
                                           "lines after 4: not read, not sent"]
    assert done.stderr.splitlines()[2].startswith("error: queue_full: ")
    assert "TPNS_MAX_PENDING (3)" in done.stderr
    assert sorted(rconn.scan_iter(match=f"{prefix}i:*")) == [f"{prefix}i:q-{k}" for k in (1, 2, 3)]
