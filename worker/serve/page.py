"""The status page of ``tpns-batcher serve`` (``GET /``) and its sign-in form.

The first answer is complete server-rendered HTML (figures from
``worker.monitor.overview.read_overview``, one status for a ``?id=`` lookup), so the page reads
without script; ``static/page.js`` then refreshes it every ``REFRESH_S`` without a reload — the
figures by fetching this page again and swapping its parts in (one formatter: this module), the
charts from ``GET /v1/timeline`` — draws the charts of the last hour, runs the lookup box
and the requeue button. The script and stylesheet ship in the package (``static/``, nothing from a
CDN) and the Content-Security-Policy allows nothing else. Every value goes through
``html.escape`` here and ``textContent`` in the script — ids, accounts, err_msg and reasons are
user or service data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any
from urllib.parse import quote

from ..keys import WORKER_TTL_S
from ..model import OPERATOR_TYPES, STATES
from ..monitor.overview import failure_reason

#: seconds between two refreshes of the page's figures and charts (``static/page.js`` reads it)
REFRESH_S = 2
#: the charts: element id -> title (``static/page.js`` fills each)
CHARTS = {
    "chart-flow": "intents in and finished per second",
    "chart-depth": "queue depth",
    "chart-calls": "calls per second",
    "chart-latency": "call latency p50 / p99 (ms)",
    "chart-failures": "failures by reason (per minute)",
}
#: headers of every HTML answer: the page's own script and stylesheet and nothing else
HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on the
    # sign-in form's POST, which the cross-origin check must refuse
    "Referrer-Policy": "same-origin",
}


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
        ("workers", f"workers seen ({WORKER_TTL_S} s)", len(f["workers"])),
    ]
    return '<dl id="figures">' + "".join(f'<dt>{_e(label)}</dt><dd id="{key}">{_e(value)}</dd>'
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
    form = ('<form id="lookup-form" method="get" action="/"><label>intent id, token or account '
            f'<input id="lookup-input" name="id" size="40" value="{_e(intent_id)}"></label> '
            '<label>account type <input id="lookup-type" type="number" min="0" value="0" '
            'size="5"></label> <button type="submit">Look up</button></form>')
    if intent_id is None:
        return form
    if status is None:
        return form + f'<p id="lookup" class="bad">{_e(intent_id)}: not found</p>'
    rows = _rows((k, v if not isinstance(v, list | dict) else _compact(v))
                 for k, v in status.items())
    return form + f'<table id="lookup">{rows}</table>'


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))




def _charts() -> str:
    return '<div id="charts">' + "".join(
        f'<figure><figcaption>{_e(title)}</figcaption><div class="chart" id="{key}"></div>'
        "</figure>" for key, title in CHARTS.items()) + "</div>"


def _document(title: str, body: str, csrf: str | None = None) -> str:
    meta = f'<meta name="csrf-token" content="{_e(csrf)}">' if csrf else ""
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title>"
            '<meta name="viewport" content="width=device-width">'
            f'<meta name="refresh-seconds" content="{REFRESH_S}">{meta}'
            '<link rel="stylesheet" href="/static/page.css">'
            '<script src="/static/page.js" defer></script></head>'
            f"<body>{body}</body></html>")


def render_page(figures: Mapping[str, Any], intent_id: str | None = None,
                status: Mapping[str, Any] | None = None, *, csrf: str | None = None,
                signed_in: bool = False) -> str:
    """The whole page: health line, per-state table, figures, charts, lookup, recent failures.

    ``csrf`` is the session's CSRF token (the script sends it on the requeue and sign-out
    requests); ``signed_in`` adds the sign-out button.
    """
    workers = figures["workers"]
    health = (f'<p id="health" class="ok">{len(workers)} worker(s) seen</p>' if workers else
              f'<p id="health" class="bad">no worker seen in the last {WORKER_TTL_S} s</p>')
    signout = ('<button id="signout" type="button">Sign out</button>' if signed_in else "")
    body = (
        f'<header><h1>tpns-batcher</h1><span id="updated" class="muted">'
        f"figures as served</span>{signout}</header>"
        f"{health}{_pauses(figures)}"
        "<h2>Last hour</h2>" + _charts()
        + "<h2>Intents</h2>" + _state_table(figures) + _figures(figures)
        + "<h2>Look up an intent, a token or an account</h2>" + _lookup(intent_id, status)
        + '<div id="lookup-results"></div>'
        + "<h2>Recent failures</h2>"
        + '<p><button id="requeue" type="button">Requeue failed intents</button> '
        + '<span id="requeue-result"></span></p>' + _failures(figures)
        + '<h3>Failures as they happen <span id="live-status" class="muted"></span></h3>'
        + '<ul id="live-failures"></ul>'
        + f'<p><small>apps: <span id="apps">{_e(", ".join(figures["apps"]))}</span> · '
        '<a href="/v1/stats">/v1/stats</a> · <a href="/metrics">/metrics</a> · '
        '<a href="/openapi.json">/openapi.json</a></small></p>'
    )
    return _document("tpns-batcher", body, csrf)


def render_signin(error: str | None = None) -> str:
    """The sign-in form shown to a browser without a session while ``TPNS_API_TOKEN`` is set.

    It posts the token once (``POST /signin``); the token is never echoed back or kept in the
    page, and ``autocomplete=off`` keeps it out of the browser's form history."""
    failed = f'<p id="signin-error" class="bad">{_e(error)}</p>' if error else ""
    body = ('<h1>tpns-batcher</h1><p>This server needs its API token (TPNS_API_TOKEN).</p>'
            f"{failed}"
            '<form id="signin" method="post" action="/signin" autocomplete="off">'
            '<label>API token <input id="signin-token" name="token" type="password" '
            'size="40" autocomplete="off" required></label> '
            '<button type="submit">Sign in</button></form>')
    return _document("tpns-batcher: sign in", body)
