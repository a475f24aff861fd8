"""``tpns-batcher demo``: the one-command tour, on nothing but Python.

It starts a private embedded Redis (or uses ``REDIS_URL`` under a fresh prefix), the sandbox with a
little latency and some injected faults, and one real worker process; enqueues a few thousand mixed
intents (some with invalid tokens, a few refused at the door); shows the pipeline live; and ends with
a summary of what happened and the commands to look further.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from ..model import STATES
from ..producer import Producer
from ..sandbox.server import SandboxServer
from ..settings import Settings
from .stack import WorkerProcess, local_redis, mixed_intent, product_settings_env, stack_env


def demo_intents(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """A realistic mix: logins (bind), logouts (unbind), uninstalls, account deletions."""
    tokens = [f"{rng.getrandbits(128):032x}" for _ in range(max(20, count // 8))]
    invalid = {tokens[k]: f"invalid-{tokens[k][:24]}" for k in range(0, len(tokens), 37)}
    out: list[dict[str, Any]] = []
    for _ in range(count):
        token = rng.choice(tokens)
        user = f"user{rng.randrange(count)}@example.com"
        phone = (f"+86137{rng.randrange(10**8):08d}", 1002)
        out.append(mixed_intent(rng.random(), invalid.get(token, token), user, append_account=phone))
    return out


#: a few intents that break SPEC §4's rules, to show refusals at the door
BAD_INTENTS: list[Any] = [
    {"operator_type": 2, "token": "has space", "account_list": [{"account": "u1"}]},
    {"operator_type": 5, "account": "13711112222", "account_type": 1002},
    {"operator_type": 7, "token": "t1"},
]


def _view(stats: dict[str, Any], sandbox: dict[str, Any], total: int, elapsed: float) -> Group:
    states = stats["states"]
    table = Table(title=f"tpns-batcher demo — {elapsed:5.1f} s", min_width=60)
    for col in STATES:
        table.add_column(col, justify="right")
    table.add_row(*(str(states[c]) for c in STATES))
    done = states["succeeded"] + states["failed"]
    calls = sandbox.get("calls", 0)
    items = sandbox.get("items", 0)
    line = (f"{done}/{total} intents final · {calls} API calls · "
            f"{items / calls if calls else 0:.1f} items per call · "
            f"{sum(sandbox.get('faults', {}).values())} faults injected")
    return Group(table, line)


def run_demo(count: int, console: Console, timeout_s: float = 180.0) -> int:
    """Run the tour; returns the process exit code."""
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="tpns-demo-") as tmp, \
            local_redis(Path(tmp), "demo") as store_redis:
        workdir = Path(tmp)
        redis_url, prefix = store_redis.url, store_redis.prefix
        sandbox = SandboxServer(latency_ms=20, fault_rate=0.05, seed=11,
                                faults=("http_503", "1008004", "1008028", "drop")).start()
        env = stack_env(store_redis, sandbox.url, TPNS_LINGER_MS="100", TPNS_LEASE_S="20",
                        TPNS_HTTP_TIMEOUT_S="5")
        worker = WorkerProcess.cli_worker(env, workdir / "worker.log", "--concurrency", "4").start()
        settings = Settings.from_env(product_settings_env(env))
        producer = Producer(redis_url, prefix, settings=settings)
        try:
            console.print(f"[bold]sandbox[/] {sandbox.url} (20 ms latency, 5 % injected faults) · "
                          f"[bold]redis[/] {redis_url} · [bold]worker[/] pid {worker.pid}")
            for bad in BAD_INTENTS:
                try:
                    producer.submit(bad)
                except Exception as exc:
                    console.print(f"refused at the door: [yellow]{exc}[/]  ← {json.dumps(bad)}")
            intents = demo_intents(count, rng)
            started = time.monotonic()
            ids = [i for i in producer.submit_many(intents) if i is not None]
            enqueue_s = time.monotonic() - started
            console.print(f"enqueued {len(ids)} intents in {enqueue_s * 1000:.0f} ms "
                          f"(one Redis round trip per 5,000)")
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while True:
                    stats = producer.stats()
                    live.update(_view(stats, sandbox.stats(), len(ids), time.monotonic() - started))
                    states = stats["states"]
                    if states["succeeded"] + states["failed"] >= len(ids):
                        break
                    if not worker.alive() or time.monotonic() - started > timeout_s:
                        console.print(f"[red]the worker stopped or the demo timed out; see "
                                      f"{workdir / 'worker.log'}[/]")
                        return 1
                    time.sleep(0.25)
            console.print()
            elapsed = time.monotonic() - started
            _summary(console, producer, sandbox.stats(), ids, elapsed)
            return 0
        finally:
            producer.close()
            worker.stop()
            sandbox.stop()


def _summary(console: Console, producer: Producer, sandbox: dict[str, Any], ids: list[str],
             elapsed: float) -> None:
    stats = producer.stats()
    statuses = [s for s in producer.statuses(ids) if s is not None]
    errors: dict[str, int] = {}
    retried = 0
    for s in statuses:
        if s.state == "failed":
            errors[s.error or "?"] = errors.get(s.error or "?", 0) + 1
        if s.attempts > 1:
            retried += 1
    failed_example = next((s for s in statuses if s.state == "failed"), None)
    calls = sandbox["calls"]
    lines = [
        f"{len(ids)} intents reached a final state in {elapsed:.1f} s: "
        f"{stats['states']['succeeded']} succeeded, {stats['states']['failed']} failed "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(errors.items())) or 'none'})",
        f"{calls} API calls instead of {len(ids)} — {sandbox['items'] / max(calls, 1):.1f} items per call "
        f"(largest {sandbox['max_items_per_call']}); intents sharing a token or an account went "
        f"one after another, in enqueue order",
        f"{sum(sandbox['faults'].values())} injected faults were retried ({retried} intents needed a "
        f"second call); none was lost",
    ]
    if failed_example is not None:
        lines.append("a failed intent's status: " + json.dumps(failed_example.to_dict()))
    lines.append("next: `tpns-batcher sandbox` and `TPNS_BASE_URL=http://127.0.0.1:8810 tpns-batcher worker` "
                 "in two terminals, then `tpns-batcher enqueue FILE`, `status ID`, `stats --watch`")
    console.print(Panel("\n".join(lines), title="summary"))


@click.command("demo")
@click.option("--intents", "count", type=click.IntRange(10, 100_000), default=3000, show_default=True,
              help="How many intents to enqueue.")
def demo_command(count: int) -> None:
    """The one-command tour: embedded Redis, the sandbox, a worker, a few thousand intents, a summary.

    Needs no credentials and no Redis; uses REDIS_URL (under a fresh key prefix) when it is set.
    """
    sys.exit(run_demo(count, Console()))
