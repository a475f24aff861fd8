"""Terminal views of the pipeline's figures (rich renderables)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..keys import WORKER_TTL_S
from ..model import OPERATOR_TYPES, STATES
from .overview import failure_reason


def stats_table(figures: dict[str, Any]) -> Table:
    """The ``stats`` figures as a table: one row per operator_type, then the totals."""
    table = Table(title="tpns-batcher", caption=_caption(figures))
    table.add_column("op", justify="right")
    for state in (*STATES, "enqueued"):
        table.add_column(state, justify="right")
    for op in OPERATOR_TYPES:
        row = figures["by_operator_type"][str(op)]
        table.add_row(str(op), *(str(row[s]) for s in (*STATES, "enqueued")))
    totals = figures["states"]
    table.add_row("all", *(str(totals[s]) for s in STATES), "", style="bold")
    return table


def _caption(f: dict[str, Any]) -> str:
    paused = ", ".join(f"{app} paused ({p['reason']}, {p['seconds_left']}s)"
                       for app, p in f["paused"].items()) or "not paused"
    return (f"queue depth {f['queue_depth']}, in flight {f['in_flight']}, oldest pending "
            f"{f['oldest_pending_age_s']}s, calls {f['calls']}, items/call {f['items_per_call']}, "
            f"leases reclaimed {f['leases_reclaimed']}{_verify_text(f['verify'])}; {paused}"
            f"{_webhook_note(f.get('webhook'))}")


def _verify_text(v: dict[str, int]) -> str:
    if not any(v.values()):
        return ""
    return (f", verified {v['ok']} (sent again {v['retry']}, not applied {v['not_applied']}, "
            f"query calls {v['query_calls']})")


def _webhook_note(hook: dict[str, Any] | None) -> str:
    """``; webhook lag N (last delivered at T, last error E)``, or nothing without a webhook."""
    if not hook:
        return ""
    lag = f"{hook['lag_events']}" + ("" if hook["lag_exact"] else "+")
    error = f", last error {hook['last_error']}" if hook["last_error"] else ""
    return (f"; webhook lag {lag} events (last delivered {hook['last_delivered_at'] or 'never'}"
            f"{error})")


def dashboard(figures: dict[str, Any]) -> Group:
    """The live view of ``stats --watch``: the stats table, calls, workers and recent failures.

    ``figures`` is a ``worker.monitor.overview.read_overview`` result.
    """
    calls = Table.grid(padding=(0, 2))
    calls.add_column(style="bold")
    calls.add_column()
    classes = ", ".join(f"{k} {v}" for k, v in figures["call_classes"].items()) or "none yet"
    latency = figures["mean_latency_ms"]
    workers = figures["workers"]
    paused = figures["paused"]
    for label, value in (
        ("queue depth", f"{figures['queue_depth']} (in flight {figures['in_flight']})"),
        ("oldest pending", f"{figures['oldest_pending_age_s']} s"),
        ("calls", f"{figures['calls']} ({classes})"),
        ("items/call", str(figures["items_per_call"])),
        ("mean latency", "n/a" if latency is None else f"{latency} ms"),
        ("items retried", str(figures["retries"])),
        ("leases reclaimed", str(figures["leases_reclaimed"])),
        ("workers seen", f"{len(workers)} " + (escape(", ".join(workers)) if workers
                                               else f"(none in {WORKER_TTL_S} s)")),
        ("webhook", escape(_webhook_note(figures.get("webhook")).removeprefix("; "))
         or "not configured"),
        ("sending", "; ".join(f"[red]{escape(app)} paused[/red] ({escape(p['reason'])}, "
                              f"{p['seconds_left']} s)"
                              for app, p in paused.items()) or "[green]not paused[/green]"),
    ):
        calls.add_row(label, value)
    parts: list[Any] = [stats_table(figures), calls]
    failures = figures["recent_failures"]
    if failures:
        recent = Table(title="recent failures", title_justify="left")
        for column in ("id", "op", "reason", "attempts", "updated"):
            recent.add_column(column)
        for st in failures:
            recent.add_row(escape(st["id"]), str(st["operator_type"]), escape(failure_reason(st)),
                           str(st["attempts"]), st["updated_at"])
        parts.append(recent)
    return Group(*parts)


def watch(read: Callable[[], dict[str, Any]], interval_s: float, console: Console | None = None,
          wait: Callable[[float], object] | None = None) -> None:
    """Refresh ``dashboard(read())`` in place every ``interval_s`` until Ctrl-C (returns then).

    ``wait`` is injectable for tests (default: an Event wait, which Ctrl-C interrupts).
    """
    pause = wait or threading.Event().wait
    try:
        with Live(dashboard(read()), console=console, auto_refresh=False,
                  redirect_stdout=False) as live:
            while True:
                pause(interval_s)
                live.update(dashboard(read()), refresh=True)
    except KeyboardInterrupt:
        return
