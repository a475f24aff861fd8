"""A worker's liveness, judged on its own host: the heartbeat file, the stuck rule, sd_notify.

The worker's watchdog (``worker/watchdog.py``) rewrites one small JSON file per worker process
every second under ``TPNS_DATA_DIR/workers/<pid>.json``. ``tpns-batcher health --worker --local``
reads those files and nothing else, so a liveness probe never fails because Redis is unreachable
(restarting every worker during a Redis outage helps nobody); it fails when the worker process is
gone or frozen (the file goes stale) or when the watchdog judged it *stuck*.

Stuck (SPEC §3.7, issue 11): the store and the broker both answer, yet for ``TPNS_WORKER_STUCK_S``
the consumer's event loop has not ticked, or, while eligible work waits in the store, the worker
has neither received a task nor claimed a batch. An outage is never "stuck": while Redis is away a
worker is supposed to sit still.

systemd's ``Type=notify`` + ``WatchdogSec`` is fed by the same judgement: ``READY=1`` once the
watchdog runs (a start during a Redis outage is a good start: the worker waits for Redis), then
``WATCHDOG=1`` on every heartbeat that is not stuck (see :func:`sd_notify`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: a heartbeat file older than this means the worker process is gone or frozen (it is rewritten
#: every second, so this leaves room for a loaded host)
HEARTBEAT_STALE_S = 30.0
#: the directory under TPNS_DATA_DIR that holds one heartbeat file per worker process
HEARTBEAT_DIR = "workers"


@dataclass(frozen=True)
class Heartbeat:
    """What one worker process says about itself (times are epoch seconds, 0 = never)."""

    pid: int
    name: str
    written_at: float
    #: the last tick of the consumer's event loop
    loop_at: float
    #: the last task received or batch claimed
    progress_at: float
    store_up: bool
    broker_up: bool
    #: eligible work waits in the store (as of the last look)
    work_waiting: bool
    #: why the watchdog judges the worker stuck ("" when it is not)
    stuck: str = ""


def stuck_reason(*, now: float, store_up: bool, broker_up: bool, up_since: float, loop_at: float,
                 progress_at: float, work_waiting: bool, stuck_s: float) -> str:
    """Why a worker is stuck, or "" (the rule of the module docstring).

    ``up_since`` is when the store and the broker last became reachable (or the worker started):
    silence before that was an outage (or start-up) and does not count.
    """
    if not (store_up and broker_up):
        return ""
    silent = now - max(loop_at, up_since)
    if silent > stuck_s:
        return f"the consumer's event loop has not run for {silent:.0f} s while Redis answers"
    idle = now - max(progress_at, up_since)
    if work_waiting and idle > stuck_s:
        return (f"no task received and no batch claimed for {idle:.0f} s while eligible work "
                f"waits and Redis answers")
    return ""


def heartbeat_dir(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / HEARTBEAT_DIR


def write_heartbeat(directory: Path, beat: Heartbeat) -> None:
    """Replace ``<directory>/<pid>.json`` atomically (a reader never sees half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{beat.pid}.json"
    tmp = directory / f".{beat.pid}.json.tmp"
    tmp.write_text(json.dumps(asdict(beat)), encoding="utf-8")
    os.replace(tmp, final)


def remove_heartbeat(directory: Path, pid: int) -> None:
    try:
        (directory / f"{pid}.json").unlink()
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def read_heartbeats(directory: Path) -> list[Heartbeat]:
    """The heartbeats of worker processes that still exist (files of dead ones are removed)."""
    beats: list[Heartbeat] = []
    if not directory.is_dir():
        return beats
    for path in sorted(directory.glob("*.json")):
        try:
            raw: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            beat = Heartbeat(**raw)
        except (OSError, ValueError, TypeError):
            continue  # being replaced, or not ours
        if not _alive(beat.pid):
            try:
                path.unlink()
            except OSError:
                pass
            continue
        beats.append(beat)
    return beats


def judge_local(beats: list[Heartbeat], now: float,
                stale_s: float = HEARTBEAT_STALE_S) -> tuple[bool, str]:
    """(healthy, one-line reason) for the worker processes of this host.

    Healthy when at least one exists and none of them is stale or stuck. Redis being unreachable
    is reported, never a failure.
    """
    if not beats:
        return False, "no worker process on this host has written a heartbeat"
    for beat in beats:
        age = now - beat.written_at
        if age > stale_s:
            return False, f"worker pid {beat.pid}: heartbeat {age:.0f} s old (frozen?)"
        if beat.stuck:
            return False, f"worker pid {beat.pid} is stuck: {beat.stuck}"
    down = sorted({part for b in beats for part, up in (("store", b.store_up),
                                                        ("broker", b.broker_up)) if not up})
    note = f"; Redis unreachable ({', '.join(down)}): waiting for it" if down else ""
    return True, f"{len(beats)} worker process(es) on this host alive{note}"


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``READY=1``, ``WATCHDOG=1``, ``STATUS=…``) to systemd, if it listens.

    The protocol is one datagram on the unix socket named by ``NOTIFY_SOCKET`` (an abstract
    socket when it starts with ``@``). Returns False when there is no such socket.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def now() -> float:
    """Wall-clock seconds: heartbeats are read by another process, so monotonic time won't do."""
    return time.time()
