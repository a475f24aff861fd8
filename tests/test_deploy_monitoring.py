"""deploy/grafana/tpns-batcher.json and deploy/prometheus/alerts.yml: well formed, and over real metrics.

The metric names and labels come from a real ``/metrics`` exposition: a worker's metrics server
(prometheus_client's HTTP server) over a real Redis, after intents went through a flush against
the sandbox over a socket. promtool (Debian package ``prometheus``) checks the rules, runs
deploy/prometheus/alerts_test.yml and parses every dashboard query; where it is not installed
those tests skip, saying so, and the structure checks here still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from worker.flush import Flusher
from worker.monitor.metrics import start_metrics_server
from worker.producer import Producer
from worker.sandbox.server import SandboxServer
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "tpns-batcher.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
RUNBOOK = ROOT / "deploy" / "README.md"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = ("promtool is not on PATH (Debian: apt-get install prometheus): skipped; "
               "the YAML and JSON structure checks still ran")

#: labels Prometheus adds to every scraped series
TARGET_LABELS = {"job", "instance"}
#: exported families the dashboard does not show (none today): a new metric needs a panel or a line here
NOT_ON_DASHBOARD: set[str] = set()
ALERT_NAMES = {"TpnsRedisDown", "TpnsMetricsAbsent", "TpnsNoWorkerSeen", "TpnsAppPaused",
               "TpnsQueueDepthGrowing", "TpnsOldestPendingTooOld", "TpnsFailureRatioHigh",
               "TpnsWebhookLag", "TpnsWebhookLagNearCap"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def panel_queries() -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel."""
    return [(f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"])
            for p in all_panels(dashboard()["panels"]) for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def without_variables(expr: str) -> str:
    """A dashboard query as Prometheus would get it (Grafana's variables filled in)."""
    return expr.replace("$__rate_interval", "1m").replace("$", "")


# -- a real exposition ---------------------------------------------------------------------------

def exposition(redis_url: str, prefix: str) -> str:
    """``/metrics`` after intents were flushed against the sandbox: one fails, the rest succeed."""
    with SandboxServer(seed=1) as sandbox:
        settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                      "TPNS_BASE_URL": sandbox.url, "TPNS_LINGER_MS": "0"})
        producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
        flusher = Flusher(settings, producer.store, wake=lambda wakes: None, sleep=lambda s: None)
        try:
            producer.submit_many([{"operator_type": 4, "token": f"tok-{k}"} for k in range(5)]
                                 + [{"operator_type": 4, "token": "invalid-1"},
                                    {"operator_type": 5, "account": "left-queued"}])
            assert flusher.flush("default", 4).items == 6
            producer.store.heartbeat("w1")
            server, thread = start_metrics_server(0, producer.store, ["default"])
            try:
                url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
                text = httpx.get(url, timeout=10).text
            finally:
                server.shutdown()
                server.server_close()
                thread.join(5)
        finally:
            flusher.close()
            producer.close()
    return text


def exported(text: str) -> tuple[dict[str, set[str]], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """Every sample name of the exposition (with _total, _bucket, ...) with its label names, and
    every sample's value."""
    names: dict[str, set[str]] = {}
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return names, values


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every series selector of a PromQL expression."""
    found = []
    for match in re.finditer(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}|\b([a-zA-Z_:][\w:]*)\b(?!\s*\()",
                             _no_label_lists(expr)):
        name = match.group(1) or match.group(3)
        if name.lower() in PROMQL_WORDS or re.fullmatch(r"\d.*|e\d*", name):
            continue
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", match.group(2) or ""))
        found.append((name, labels))
    return found


def _no_label_lists(expr: str) -> str:
    """The expression without ``by (...)``-like lists, range/offset durations and bare strings."""
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    # strings outside a selector's braces (histogram_quantile's or label_replace's arguments)
    return re.sub(r"(\{[^}]*\})|\"[^\"]*\"", lambda m: m.group(1) or " ", text)


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
        for label in group.split(",") if label.strip()}


def problems(expr: str, names: dict[str, set[str]]) -> list[str]:
    """Metrics of ``expr`` not in ``names``, labels its selectors match or group by that they lack."""
    found = selectors(expr)
    out = [f"unknown metric {n}" for n, _ in found if n not in names]
    out += [f"unknown label {sorted(ls - names[n] - TARGET_LABELS)}" for n, ls in found
            if n in names and not ls <= names[n] | TARGET_LABELS]
    allowed = set().union(*(names.get(n, set()) for n, _ in found)) | TARGET_LABELS
    out += [f"unknown grouping {sorted(grouping_labels(expr) - allowed)}"
            for _ in [0] if not grouping_labels(expr) <= allowed]
    return out


def test_every_metric_and_label_used_is_exported(redis_url: str, prefix: str) -> None:
    names, values = exported(exposition(redis_url, prefix))
    # a real exposition: the flush's one call (5 ok, 1 invalid token) and the intent left queued
    assert values[("tpns_api_calls_total", frozenset({("operator_type", "4"),
                                                      ("result", "partly_failed")}))] == 1
    assert values[("tpns_intents_completed_total", frozenset({("operator_type", "4"),
                                                              ("outcome", "failed")}))] == 1
    assert values[("tpns_queue_depth", frozenset({("operator_type", "5")}))] == 1
    assert values[("tpns_api_call_duration_seconds_count", frozenset())] == 1
    known = names
    uses = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + [
        (f"dashboard {where}", without_variables(expr)) for where, expr in panel_queries()]
    for where, expr in uses:
        assert selectors(expr), f"{where}: no metric in {expr!r}"
        assert problems(expr, known) == [], f"{where}: {expr!r} (exported: {sorted(names)})"

    # every exported family is on the dashboard (a histogram through any of its series)
    shown = {name for _, expr in panel_queries() for name, _ in selectors(without_variables(expr))}
    families = {re.sub(r"_(bucket|count|sum)$", "", n) if n.endswith(("_bucket", "_count", "_sum"))
                else n for n in names}
    missing = {f for f in families - NOT_ON_DASHBOARD
               if not any(s == f or s.startswith(f + "_") for s in shown)}
    assert not missing, f"exported but on no panel: {sorted(missing)}"


@pytest.mark.parametrize(("expr", "objection"), [
    ("up == 0", "unknown metric up"),
    ("rate(tpns_intents_enqueued[5m])", "unknown metric tpns_intents_enqueued"),
    ('tpns_queue_depth{app="a"}', "unknown label ['app']"),
    ("sum by (app) (tpns_queue_depth)", "unknown grouping ['app']"),
    ("histogram_quantile(0.5, rate(tpns_api_call_duration_seconds[5m]))",
     "unknown metric tpns_api_call_duration_seconds"),
    ('max by (job, le) (rate(tpns_api_call_duration_seconds_bucket{job="x"}[5m])) > 1e3', None),
    ('sum(tpns_queue_depth{operator_type=~"4|5"} offset 5m) or vector(0)', None),
])
def test_the_name_check_catches_what_is_not_exported(expr: str, objection: str | None) -> None:
    names = {"tpns_queue_depth": {"operator_type"}, "tpns_intents_enqueued_total": {"operator_type"},
             "tpns_api_call_duration_seconds_bucket": {"le"}}
    assert problems(expr, names) == ([objection] if objection else [])


# -- the alert rules -----------------------------------------------------------------------------

def runbook_anchors() -> set[str]:
    """GitHub's anchors of deploy/README.md's headings."""
    headings = re.findall(r"^#+ (.+)$", RUNBOOK.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_alert_rules_are_well_formed() -> None:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(data) == {"groups"} and data["groups"]
    for group in data["groups"]:
        assert isinstance(group["name"], str) and group["rules"], group
    rules = alert_rules()
    assert sorted(r["alert"] for r in rules) == sorted(ALERT_NAMES)  # each once
    anchors = runbook_anchors()
    for rule in rules:
        name = rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, name
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert re.fullmatch(r"(\d+[smhd])+", rule["for"]), f"{name}: for {rule['for']!r}"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert all(isinstance(v, str) and v.strip() for v in annotations.values()), name
        path, _, anchor = annotations["runbook"].partition("#")
        assert path == "deploy/README.md" and anchor in anchors, \
            f"{name}: runbook {annotations['runbook']!r} is not a heading of deploy/README.md"


def test_alerts_state_the_thresholds_the_brief_asks_for() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert rules["TpnsQueueDepthGrowing"]["for"] == "10m"
    assert "deriv(tpns_queue_depth[10m])" in rules["TpnsQueueDepthGrowing"]["expr"]
    assert rules["TpnsOldestPendingTooOld"]["expr"].endswith("> 300")
    assert "> 0.05" in rules["TpnsFailureRatioHigh"]["expr"]
    assert rules["TpnsAppPaused"]["expr"].endswith("== 1") and rules["TpnsAppPaused"]["for"] == "1m"
    assert rules["TpnsNoWorkerSeen"]["expr"].endswith("== 0") and rules["TpnsNoWorkerSeen"]["for"] == "2m"
    assert rules["TpnsRedisDown"]["expr"] == "tpns_redis_up == 0"
    # well before the default TPNS_EVENTS_MAXLEN (1,000,000), where undelivered events are trimmed
    assert rules["TpnsWebhookLag"]["expr"].endswith("> 100000")


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([str(PROMTOOL), "check", "rules", str(ALERTS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in done.stdout


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_unit_tests_say_which_alerts_fire() -> None:
    done = subprocess.run([str(PROMTOOL), "test", "rules", str(ALERTS_TEST)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # every alert is shown firing somewhere in the unit tests
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case.get("exp_alerts")}
    assert fired == ALERT_NAMES


# -- the dashboard -------------------------------------------------------------------------------

def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # the filters are Prometheus label queries over exported metrics that carry the label
    assert variables["job"]["definition"] == "label_values(tpns_redis_up, job)"
    assert variables["app"]["definition"].startswith("label_values(tpns_paused")
    assert variables["app"]["definition"].endswith(", app)")
    panels = list(all_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy") and grid["x"] + grid["w"] <= 24, where
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                   for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, f"{where} overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        targets = panel["targets"]
        assert targets, f"{where} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), where
        for target in targets:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], where
            assert '{job="$job"' in target["expr"] or 'job="$job"' in target["expr"], \
                f"{where}: a query that ignores the job variable"
    used = " ".join(expr for _, expr in panel_queries())
    assert '$app' in used and "$operator_type" in used
    webhook = [p for p in panels if "tpns_webhook_lag_events" in json.dumps(p.get("targets", []))]
    assert webhook and all("TPNS_WEBHOOK_URL" in p["description"] for p in webhook)


def test_dashboard_shows_the_figures_an_on_call_engineer_looks_for() -> None:
    queries = " ".join(expr for _, expr in panel_queries())
    for needed in ("rate(tpns_intents_enqueued_total", "rate(tpns_intents_completed_total",
                   "tpns_queue_depth", "tpns_oldest_pending_age_seconds",
                   "sum by (result) (max by (operator_type, result) (rate(tpns_api_calls_total",
                   "histogram_quantile(0.5, max by (le) (rate(tpns_api_call_duration_seconds_bucket",
                   "histogram_quantile(0.99, max by (le) (rate(tpns_api_call_duration_seconds_bucket",
                   "rate(tpns_batch_size_items_sum", 'outcome="failed"', "tpns_retries_total",
                   "tpns_paused", "tpns_workers_seen", "tpns_leases_reclaimed_total",
                   "tpns_webhook_lag_events", "increase(tpns_webhook_failures_total",
                   "increase(tpns_webhook_gaps_total"):
        assert needed in queries, needed


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{n}", "expr": without_variables(expr)}
             for n, (_, expr) in enumerate(panel_queries())]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}),
                    encoding="utf-8")
    done = subprocess.run([str(PROMTOOL), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
