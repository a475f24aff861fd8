"""Terminal views of the pipeline's figures (rich renderables)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .model import OPERATOR_TYPES


def stats_table(figures: dict[str, Any]) -> Table:
    """The ``stats`` figures as a table: one row per operator_type, then the totals."""
    states = ("queued", "sending", "retrying", "succeeded", "failed")
    table = Table(title="tpns-batcher", caption=_caption(figures))
    table.add_column("op", justify="right")
    for state in (*states, "enqueued"):
        table.add_column(state, justify="right")
    for op in OPERATOR_TYPES:
        row = figures["by_operator_type"][str(op)]
        table.add_row(str(op), *(str(row[s]) for s in (*states, "enqueued")))
    totals = figures["states"]
    table.add_row("all", *(str(totals[s]) for s in states), "", style="bold")
    return table


def _caption(f: dict[str, Any]) -> str:
    paused = ", ".join(f"{app} paused ({p['reason']}, {p['seconds_left']}s)"
                       for app, p in f["paused"].items()) or "not paused"
    return (f"queue depth {f['queue_depth']}, in flight {f['in_flight']}, oldest pending "
            f"{f['oldest_pending_age_s']}s, calls {f['calls']}, items/call {f['items_per_call']}, "
            f"leases reclaimed {f['leases_reclaimed']}; {paused}")
