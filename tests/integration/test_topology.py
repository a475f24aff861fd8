"""The compose topology as local processes: one worker with beat, one without, and ``serve``.

The commands are read from deploy/docker-compose.yml (only the host, port and concurrency are
adapted to one machine), so this runs what compose would run: against one Redis under the test's
prefix and an in-process sandbox. It checks that the intents drain in batches (the flush rule,
claim by claim), that the sweeps run from exactly one beat, and that ``serve``'s /healthz sees
both workers.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import yaml

from tests.support.polling import wait_until
from worker.sandbox.server import SandboxServer
from worker.tools.drill import free_port
from worker.tools.stack import WorkerProcess

from .conftest import WORKER_COMMAND, MakeProducer, product_env
from .helpers import assert_flush_rule

pytestmark = pytest.mark.e2e

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "docker-compose.yml"
INTENTS = 500
POOL = 2
LINGER_MS = int(product_env("", "")["TPNS_LINGER_MS"])
_PRODUCT_VARS = ("TPNS_", "REDIS_URL", "CELERY_")


def compose_command(service: str, **options: str) -> list[str]:
    """The service's command from the compose file, with ``--option value`` pairs replaced."""
    argv = [str(a) for a in yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
            ["services"][service]["command"]]
    assert argv[0] == "tpns-batcher"
    argv[0] = WORKER_COMMAND
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        assert flag in argv, f"{service}'s command has no {flag}"
        argv[argv.index(flag) + 1] = value
    return argv




def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def intents(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k in range(n):
        token = f"topo-{k % 300:04d}"
        if k % 10 == 9:
            out.append({"operator_type": 4, "token": token})
        elif k % 10 == 8:
            out.append({"operator_type": 5, "account": f"user-{k % 50}"})
        else:
            out.append({"operator_type": 2, "token": token,
                        "account_list": [{"account": f"user-{k % 50}"}]})
    return out


def test_compose_topology(redis_url: str, prefix: str, tmp_path: Path, sandbox: SandboxServer,
                          make_producer: MakeProducer, rconn: redis.Redis) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PRODUCT_VARS)}
    env.update(product_env(redis_url, prefix, TPNS_BASE_URL=sandbox.url,
                           TPNS_DATA_DIR=str(tmp_path / "data"), TPNS_LOG_FORMAT="json"))
    port = free_port()
    commands = {
        "worker-beat": compose_command("worker-beat", concurrency=str(POOL)),
        "worker": compose_command("worker", concurrency=str(POOL)),
        "serve": compose_command("serve", host="127.0.0.1", port=str(port)),
    }
    processes: dict[str, WorkerProcess] = {}
    try:
        for name, argv in commands.items():
            processes[name] = WorkerProcess(argv, env, tmp_path / f"{name}.log", name=name,
                                            cwd=tmp_path).start()
        _check_topology(processes, port, prefix, make_producer, rconn, sandbox)
    except BaseException:
        for process in processes.values():
            print(f"----- log of {process.name} -----\n{process.log()[-8000:]}")
        raise
    finally:
        for process in processes.values():
            process.kill()


def _check_topology(processes: dict[str, WorkerProcess], port: int, prefix: str,
                    make_producer: MakeProducer, rconn: redis.Redis,
                    sandbox: SandboxServer) -> None:
    workers = [processes["worker-beat"], processes["worker"]]
    for worker in workers:
        worker.wait_ready(timeout_s=30)
    sweeps_key = f"{prefix}n"

    def sweeps() -> int:
        return int(rconn.hget(sweeps_key, "sweeps") or 0)

    first = wait_until(sweeps, 10, message="a first sweep")

    producer = make_producer(TPNS_BASE_URL=sandbox.url)
    ids = [i for i in producer.submit_many(intents(INTENTS)) if i is not None]
    assert len(ids) == INTENTS

    def terminal() -> bool:
        states = [s.state if s else None for s in producer.statuses(ids)]
        return all(s in ("succeeded", "failed") for s in states)

    wait_until(terminal, 30, interval_s=0.1, message="every intent terminal")
    states = {s.state for s in producer.statuses(ids) if s}
    assert states == {"succeeded"}
    # batched: every claim of both workers took all it could, a partial one only after the
    # linger (SPEC §3.2), and together they sent every intent once
    claims = assert_flush_rule([w.log() for w in workers], 20, LINGER_MS)
    assert sum(c.items for c in claims) == INTENTS == producer.store.counters()["items_sent"]
    # both workers took wakes from the shared queue
    for worker in workers:
        assert "tpns.flush" in worker.log(), f"{worker.name} ran no flush"

    # exactly one beat: the sweeps go on, and only worker-beat runs one. The default pool is
    # threads in the worker's own process, so its only child is the embedded beat (--beat)
    wait_until(lambda: sweeps() >= first + 3, 30, message="three more sweeps")
    children = {w.name: len(psutil.Process(w.pid).children()) for w in workers}
    assert children == {"worker-beat": 1, "worker": 0}, children

    # serve's /healthz sees both workers, each heartbeating as hostname:pid
    host = socket.gethostname()
    expected = {f"{host}:{w.pid}" for w in workers}
    assert set(producer.store.workers()) == expected
    def healthz() -> Any:
        status, body = get_json(f"http://127.0.0.1:{port}/healthz")
        return body if status == 200 else None

    body = wait_until(healthz, 20, message="serve's /healthz answering 200")
    assert body["ok"] is True and body["workers"] == len(expected), body
    assert processes["serve"].proc.poll() is None
