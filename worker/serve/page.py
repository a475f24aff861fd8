"""The status page of ``tpns-batcher serve`` (``GET /``): plain server-rendered HTML, no script.

Everything shown comes from ``worker.monitor.overview.read_overview`` (and one status for a lookup), and
every value goes through ``html.escape`` — ids, accounts, err_msg and reasons are user or
service data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any
from urllib.parse import quote

from ..model import OPERATOR_TYPES, STATES
from ..monitor.overview import failure_reason

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child,.left{text-align:left}
.bad{color:#a00;font-weight:bold}.ok{color:#070;font-weight:bold}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dd{margin:0}
code{background:#f4f4f4;padding:0 .2em}
#lookup td{text-align:left}
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _rows(cells: Iterable[Iterable[object]], tag: str = "td") -> str:
    return "".join("<tr>" + "".join(f"<{tag}>{_e(c)}</{tag}>" for c in row) + "</tr>"
                   for row in cells)


def _state_table(f: Mapping[str, Any]) -> str:
    head = _rows([("operator_type", *STATES, "enqueued")], "th")
    body = _rows((op, *(f["by_operator_type"][str(op)][s] for s in (*STATES, "enqueued")))
                 for op in OPERATOR_TYPES)
    totals = _rows([("all", *(f["states"][s] for s in STATES), "")])
    return f'<table id="states">{head}{body}{totals}</table>'


def _figures(f: Mapping[str, Any]) -> str:
    classes = ", ".join(f"{k} {v}" for k, v in f["call_classes"].items()) or "none yet"
    latency = "n/a" if f["mean_latency_ms"] is None else f"{f['mean_latency_ms']} ms"
    items = [
        ("queue-depth", "queue depth (queued + retrying + verifying)", f["queue_depth"]),
        ("in-flight", "in flight", f["in_flight"]),
        ("oldest-pending", "oldest pending", f"{f['oldest_pending_age_s']} s"),
        ("calls", "calls", f["calls"]),
        ("items-per-call", "items per call", f["items_per_call"]),
        ("call-classes", "calls by result", classes),
        ("latency", "mean call latency", latency),
        ("retries", "items retried", f["retries"]),
        ("leases-reclaimed", "leases reclaimed", f["leases_reclaimed"]),
        ("verifying", "verifying now", f["states"]["verifying"]),
        ("verification", "verification (TPNS_VERIFY)", _verification(f["verify"])),
        ("workers", "workers seen (30 s)", len(f["workers"])),
    ]
    return "<dl>" + "".join(f'<dt>{_e(label)}</dt><dd id="{key}">{_e(value)}</dd>'
                            for key, label, value in items) + "</dl>"


def _verification(v: Mapping[str, int]) -> str:
    if not any(v.values()):
        return "none (off, or nothing checked yet)"
    return (f"seen applied {v['ok']}, sent again {v['retry']}, not applied {v['not_applied']}, "
            f"query calls {v['query_calls']}")


def _pauses(f: Mapping[str, Any]) -> str:
    if not f["paused"]:
        return '<p id="pause" class="ok">sending: not paused</p>'
    parts = [f"{app} paused ({p['reason']}, {p['seconds_left']} s left)"
             for app, p in f["paused"].items()]
    return f'<p id="pause" class="bad">{_e("; ".join(parts))}</p>'


def _failures(f: Mapping[str, Any]) -> str:
    failures = f["recent_failures"]
    if not failures:
        return '<p id="failures">No recent failures.</p>'
    head = "<tr><th>id</th><th>op</th><th>reason</th><th>attempts</th><th>updated</th></tr>"
    rows = "".join(
        f'<tr><td><a href="/?id={quote(s["id"], safe="")}">{_e(s["id"])}</a></td>'
        f'<td>{_e(s["operator_type"])}</td><td class="left">{_e(failure_reason(s))}</td>'
        f'<td>{_e(s["attempts"])}</td><td>{_e(s["updated_at"])}</td></tr>'
        for s in failures)
    return f'<table id="failures">{head}{rows}</table>'


def _lookup(intent_id: str | None, status: Mapping[str, Any] | None) -> str:
    form = ('<form method="get" action="/"><label>intent id <input name="id" size="40" '
            f'value="{_e(intent_id)}"></label> <button type="submit">Look up</button></form>')
    if intent_id is None:
        return form
    if status is None:
        return form + f'<p id="lookup" class="bad">{_e(intent_id)}: not found</p>'
    rows = _rows((k, v if not isinstance(v, list | dict) else _compact(v))
                 for k, v in status.items())
    return form + f'<table id="lookup">{rows}</table>'


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def render_page(figures: Mapping[str, Any], intent_id: str | None = None,
                status: Mapping[str, Any] | None = None) -> str:
    """The whole page: health line, per-state table, figures, recent failures and a lookup."""
    workers = figures["workers"]
    health = (f'<p id="health" class="ok">{len(workers)} worker(s) seen</p>' if workers else
              '<p id="health" class="bad">no worker seen in the last 30 s</p>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>tpns-batcher</title>"
        f'<meta name="viewport" content="width=device-width"><style>{_STYLE}</style></head>'
        "<body><h1>tpns-batcher</h1>"
        f"{health}{_pauses(figures)}"
        "<h2>Intents</h2>" + _state_table(figures) + _figures(figures)
        + "<h2>Look up an intent</h2>" + _lookup(intent_id, status)
        + "<h2>Recent failures</h2>" + _failures(figures)
        + f'<p><small>apps: {_e(", ".join(figures["apps"]))} · '
        '<a href="/v1/stats">/v1/stats</a> · <a href="/metrics">/metrics</a> · '
        '<a href="/openapi.json">/openapi.json</a></small></p></body></html>'
    )
