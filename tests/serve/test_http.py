"""``tpns-batcher serve`` over a real socket (uvicorn in a thread) against a real Redis."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.live_server import serving
from worker.errors import IntentError
from worker.intents import validate
from worker.producer import Producer
from worker.serve.app import create_app
from worker.serve.body import MAX_BODY_BYTES, MAX_INTENTS
from worker.settings import Settings

OP4 = {"operator_type": 4, "token": "tok-a"}
Api = Callable[..., AbstractContextManager[tuple[httpx.Client, Producer]]]


def make_settings(redis_url: str, prefix: str, **extra: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                              "TPNS_LINGER_MS": "0", **extra})


@pytest.fixture
def api(redis_url: str, prefix: str) -> Api:
    """Start a server: ``with api(TPNS_API_TOKEN="...") as (client, producer): ...``."""

    @contextmanager
    def start(url: str = redis_url, **env: str) -> Iterator[tuple[httpx.Client, Producer]]:
        settings = make_settings(url, prefix, **env)
        with Producer(url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
                serving(create_app(producer, settings)) as base, \
                httpx.Client(base_url=base, timeout=10) as client:
            yield client, producer

    return start


@pytest.fixture
def http(api: Api) -> Iterator[tuple[httpx.Client, Producer]]:
    with api() as pair:
        yield pair


def post_jsonl(client: httpx.Client, text: str | bytes,
               content_type: str = "application/x-ndjson") -> httpx.Response:
    return client.post("/v1/intents", content=text, headers={"Content-Type": content_type})


# -- POST /v1/intents ---------------------------------------------------------------------------

def test_one_object_is_enqueued_and_its_status_is_served(http: tuple[httpx.Client, Producer]
                                                          ) -> None:
    client, producer = http
    r = client.post("/v1/intents", json={"operator_type": 2, "token": "t1",
                                         "account_list": [{"account": "u1"}]})
    assert r.status_code == 200
    body = r.json()
    assert body["accepted"] == 1 and body["refused"] == 0 and body["errors"] == []
    (intent_id,) = body["ids"]
    got = client.get(f"/v1/intents/{intent_id}")
    assert got.status_code == 200
    assert got.json() == producer.status(intent_id).to_dict()  # type: ignore[union-attr]
    assert got.json()["state"] == "queued"
    assert got.json()["account_list"] == [{"account": "u1", "account_type": 0}]


def test_an_array_is_judged_item_by_item(http: tuple[httpx.Client, Producer]) -> None:
    client, producer = http
    r = client.post("/v1/intents", json=[OP4, {"operator_type": 4, "token": ""},
                                         {"operator_type": 4, "token": "tok-b"}])
    body = r.json()
    assert r.status_code == 200
    assert body["ids"][1] is None and None not in (body["ids"][0], body["ids"][2])
    assert body["errors"] == [{"index": 1, "line": None, "field": "token",
                               "reason": "token: must not be empty"}]
    assert (body["accepted"], body["refused"]) == (2, 1)
    assert producer.stats()["states"]["queued"] == 2


RULES: list[tuple[str, Any, str]] = [
    ("operator_type missing", {"token": "t"}, "operator_type"),
    ("operator_type as string", {"operator_type": "2", "token": "t"}, "operator_type"),
    ("operator_type as bool", {"operator_type": True, "token": "t"}, "operator_type"),
    ("operator_type out of range", {"operator_type": 6, "token": "t"}, "operator_type"),
    ("not an object", 5, "intent"),
    ("unknown field", {**OP4, "colour": "red"}, "colour"),
    ("field of another op", {**OP4, "account_list": [{"account": "u"}]}, "account_list"),
    ("token missing", {"operator_type": 4}, "token"),
    ("token empty", {"operator_type": 4, "token": ""}, "token"),
    ("token too long", {"operator_type": 4, "token": "x" * 65}, "token"),
    ("token multibyte too long", {"operator_type": 4, "token": "é" * 33}, "token"),
    ("token with space", {"operator_type": 4, "token": "a b"}, "token"),
    ("token with control", {"operator_type": 4, "token": "a\x01b"}, "token"),
    ("token not a string", {"operator_type": 4, "token": 7}, "token"),
    ("account_list missing", {"operator_type": 2, "token": "t"}, "account_list"),
    ("account_list empty", {"operator_type": 2, "token": "t", "account_list": []},
     "account_list"),
    ("account_list too long", {"operator_type": 2, "token": "t",
                               "account_list": [{"account": f"u{k}"} for k in range(21)]},
     "account_list"),
    ("account_list not a list", {"operator_type": 3, "token": "t", "account_list": "u"},
     "account_list"),
    ("account entry not an object", {"operator_type": 1, "token": "t", "account_list": ["u"]},
     "account_list[0]"),
    ("account empty", {"operator_type": 2, "token": "t", "account_list": [{"account": ""}]},
     "account_list[0].account"),
    ("account too long", {"operator_type": 2, "token": "t",
                          "account_list": [{"account": "a" * 101}]}, "account_list[0].account"),
    ("account with control", {"operator_type": 2, "token": "t",
                              "account_list": [{"account": "a\nb"}]}, "account_list[0].account"),
    ("account_type unknown", {"operator_type": 2, "token": "t",
                              "account_list": [{"account": "u", "account_type": 17}]},
     "account_list[0].account_type"),
    ("account_type as string", {"operator_type": 2, "token": "t",
                                "account_list": [{"account": "u", "account_type": "1"}]},
     "account_list[0].account_type"),
    ("phone not E.164", {"operator_type": 2, "token": "t",
                         "account_list": [{"account": "13711112222", "account_type": 1002}]},
     "account_list[0].account"),
    ("account_type a float", {"operator_type": 2, "token": "t",
                              "account_list": [{"account": "u"}, {"account": "v", "account_type": 1.0}]},
     "account_list[1].account_type"),
    ("token a lone surrogate", {"operator_type": 4, "token": "\ud800"}, "token"),
    ("op 5 without account", {"operator_type": 5}, "account"),
    ("op 5 with a token", {"operator_type": 5, "account": "u", "token": "t"}, "token"),
    ("op 5 bad account_type", {"operator_type": 5, "account": "u", "account_type": 1016},
     "account_type"),
    ("unknown app", {**OP4, "app": "nope"}, "app"),
    ("bad id", {**OP4, "id": "has space"}, "id"),
    ("id too long", {**OP4, "id": "i" * 65}, "id"),
]


def test_each_rule_of_spec_4_is_refused_naming_the_field(
        http: tuple[httpx.Client, Producer]) -> None:
    """One request with one intent per rule (and a valid one last): every refusal names its
    field, with the very reason ``worker.intents.validate`` gives, and only the valid one is
    stored."""
    client, producer = http
    expected = []
    for k, (name, intent, field) in enumerate(RULES):
        with pytest.raises(IntentError) as refused:
            validate(intent, {"default"})
        assert refused.value.field == field, name
        expected.append({"index": k, "line": None, "field": field,
                         "reason": refused.value.reason})
    # ASCII JSON: a lone surrogate travels as the escape \ud800, as any JSON encoder writes it
    r = post_jsonl(client, json.dumps([intent for _, intent, _ in RULES] + [OP4]), "application/json")
    assert r.status_code == 200
    body = r.json()
    assert body["ids"][:-1] == [None] * len(RULES) and body["ids"][-1] is not None
    assert (body["accepted"], body["refused"]) == (1, len(RULES))
    for got, want, (name, _, _) in zip(body["errors"], expected, RULES, strict=True):
        assert got == want, name
        assert got["reason"].startswith(f"{got['field']}: "), name
    assert producer.stats()["states"]["queued"] == 1


def test_an_id_is_idempotent_and_a_conflicting_payload_is_refused(
        http: tuple[httpx.Client, Producer]) -> None:
    client, _ = http
    first = client.post("/v1/intents", json={**OP4, "id": "login-1"}).json()
    again = client.post("/v1/intents", json={**OP4, "id": "login-1"}).json()
    other = client.post("/v1/intents", json={"operator_type": 4, "token": "tok-z",
                                             "id": "login-1"}).json()
    assert first["ids"] == again["ids"] == ["login-1"]
    assert other["ids"] == [None] and other["errors"][0]["field"] == "id"


def test_json_lines_skip_blank_lines_and_count_physical_lines(
        http: tuple[httpx.Client, Producer]) -> None:
    client, _ = http
    text = ('\n{"operator_type": 4, "token": "t1"}\r\n\n   \n'
            '{"operator_type": 4, "token": ""}\n'
            "not json\n"
            '{"operator_type": 4, "token": "t2"}\n')
    r = post_jsonl(client, text)
    body = r.json()
    assert r.status_code == 200
    assert [i is not None for i in body["ids"]] == [True, False, False, True]
    assert body["errors"] == [
        {"index": 1, "line": 5, "field": "token", "reason": "token: must not be empty"},
        {"index": 2, "line": 6, "field": "json",
         "reason": "json: not valid JSON (Expecting value at column 1)"},
    ]
    for kind in ("application/jsonl", "application/x-ndjson; charset=utf-8"):
        assert post_jsonl(client, '{"operator_type": 4, "token": "t3"}', kind).json()[
            "accepted"] == 1


BAD_BODIES: list[tuple[str, bytes, str, int]] = [
    ("empty", b"", "application/json", 400),
    ("whitespace", b"  \n ", "application/json", 400),
    ("blank lines only", b"\n\n  \n", "application/x-ndjson", 400),
    ("not JSON", b"hello", "application/json", 400),
    ("JSON Lines sent as JSON", b'{"operator_type": 4}\n{"operator_type": 4}',
     "application/json", 400),
    ("not UTF-8", b'{"operator_type": 4, "token": "\xff"}', "application/json", 400),
    ("a JSON string", b'"intent"', "application/json", 400),
    ("an empty array", b"[]", "application/json", 400),
    ("nested too deeply", b"[" * 200_000 + b"]" * 200_000, "application/json", 400),
    ("text/plain", json.dumps(OP4).encode(), "text/plain", 415),
    ("form", b"operator_type=4", "application/x-www-form-urlencoded", 415),
    ("no content type", json.dumps(OP4).encode(), "", 415),
    ("over the size limit", b"[" + b" " * MAX_BODY_BYTES + b"]", "application/json", 413),
    ("too many intents", json.dumps([OP4] * (MAX_INTENTS + 1)).encode(), "application/json",
     413),
    ("too many lines", (json.dumps(OP4) + "\n").encode() * (MAX_INTENTS + 1),
     "application/x-ndjson", 413),
]


def test_a_json_lines_line_that_is_not_utf8_is_refused_alone(http: tuple[httpx.Client, Producer]) -> None:
    client, producer = http
    body = b'\xef\xbb\xbf{"operator_type": 4, "token": "a"}\r\n{"operator_type": 4, "token": "\xff"}\r\n' \
           b'{"operator_type": 4, "token": "c"}\r\n'
    r = post_jsonl(client, body)
    assert r.status_code == 200
    out = r.json()
    assert out["refused"] == 1 and out["ids"][1] is None
    assert out["errors"] == [{"index": 1, "line": 2, "field": "json", "reason": out["errors"][0]["reason"]}]
    assert "UTF-8" in out["errors"][0]["reason"]
    assert [s.token for s in producer.statuses([out["ids"][0], out["ids"][2]])] == ["a", "c"]  # type: ignore[union-attr]


@pytest.mark.parametrize(("body", "content_type", "status"),
                         [(b, c, s) for _, b, c, s in BAD_BODIES],
                         ids=[name for name, *_ in BAD_BODIES])
def test_bad_bodies_are_refused_whole_and_store_nothing(
        http: tuple[httpx.Client, Producer], body: bytes, content_type: str, status: int) -> None:
    client, producer = http
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/v1/intents", content=body, headers=headers)
    assert r.status_code == status
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert producer.store.counters() == {}


def test_a_streamed_body_over_the_limit_is_refused(http: tuple[httpx.Client, Producer]) -> None:
    client, producer = http

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        yield b"["
        for _ in range(MAX_BODY_BYTES // 65536 + 1):
            yield b" " * 65536

    r = client.post("/v1/intents", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert producer.store.counters() == {}


# -- reads ----------------------------------------------------------------------------------------

def test_an_unknown_id_is_404(http: tuple[httpx.Client, Producer]) -> None:
    client, _ = http
    r = client.get("/v1/intents/no-such-id")
    assert r.status_code == 404 and r.json() == {"error": "not found"}


def test_stats_are_the_stores(http: tuple[httpx.Client, Producer]) -> None:
    client, producer = http
    client.post("/v1/intents", json=[OP4, {"operator_type": 5, "account": "u"}])
    r = client.get("/v1/stats")
    assert r.status_code == 200
    stats = r.json()
    assert stats["states"]["queued"] == 2 and stats["queue_depth"] == 2
    assert stats["by_operator_type"]["5"]["enqueued"] == 1
    assert stats == producer.stats() | {"oldest_pending_age_s": stats["oldest_pending_age_s"]}


def test_healthz_needs_a_worker_and_no_pause(http: tuple[httpx.Client, Producer]) -> None:
    client, producer = http
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["ok"] is False
    assert "no worker" in r.json()["reason"]
    producer.store.heartbeat("w1")
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["workers"] == 1
    producer.store.pause("default", 30, "credentials:1008003")
    r = client.get("/healthz")
    assert r.status_code == 503
    assert "default paused" in r.json()["reason"] and "1008003" in r.json()["reason"]
    producer.store.resume("default")
    assert client.get("/healthz").status_code == 200


def test_redis_down_is_503_never_500(api: Api) -> None:
    with api("redis://127.0.0.1:1/0") as (client, _):
        assert client.post("/v1/intents", json=OP4).status_code == 503
        assert client.get("/v1/stats").status_code == 503
        assert client.get("/v1/intents/x").status_code == 503
        health = client.get("/healthz")
        assert health.status_code == 503 and "redis unreachable" in health.json()["reason"]
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "tpns_redis_up 0.0" in metrics.text


# -- auth -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Bearer",
                                           "Basic s3cr3t-api-token", "s3cr3t-api-token",
                                           "Bearer s3cr3t-api-token-and-more"])
def test_with_a_token_every_route_but_healthz_needs_it(api: Api,
                                                       authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with api(TPNS_API_TOKEN="s3cr3t-api-token") as (client, producer):
        for method, path in [("GET", "/v1/stats"), ("GET", "/v1/intents/x"), ("GET", "/metrics"),
                             ("GET", "/"), ("GET", "/openapi.json"), ("POST", "/v1/intents"),
                             ("GET", "/v1/overview"), ("GET", "/v1/timeline"),
                             ("GET", "/v1/events?follow=false"), ("POST", "/v1/requeue-failed"),
                             ("POST", "/signout")]:
            r = client.request(method, path, headers=headers, json=OP4)
            assert r.status_code == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "s3cr3t" not in r.text
        page = client.get("/", headers=headers)  # the sign-in form, and no figure
        assert 'action="/signin"' in page.text and 'id="states"' not in page.text
        assert client.get("/healthz", headers=headers).status_code == 503  # open, no worker yet
        assert producer.store.counters() == {}


def test_the_right_token_opens_every_route(api: Api) -> None:
    with api(TPNS_API_TOKEN="s3cr3t-api-token") as (client, _):
        auth = {"Authorization": "Bearer s3cr3t-api-token"}
        assert client.post("/v1/intents", json=OP4, headers=auth).json()["accepted"] == 1
        for path in ("/v1/stats", "/metrics", "/", "/openapi.json"):
            assert client.get(path, headers=auth).status_code == 200, path
        assert client.get("/healthz").status_code == 503


def test_without_a_token_no_route_asks_for_one(http: tuple[httpx.Client, Producer]) -> None:
    client, _ = http
    for path in ("/v1/stats", "/metrics", "/", "/openapi.json"):
        assert client.get(path).status_code == 200, path


# -- metrics --------------------------------------------------------------------------------------

def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_a_completed_batch(http: tuple[httpx.Client, Producer]) -> None:
    client, producer = http
    intents = [{"operator_type": 2, "token": f"t{k}", "account_list": [{"account": f"u{k}"}]}
               for k in range(3)]
    ids = client.post("/v1/intents", json=intents).json()["ids"]
    client.post("/v1/intents", json={"operator_type": 5, "account": "left-queued"})
    store = producer.store
    claim = store.claim("default", 2)
    assert claim.kind == "batch" and sorted(i.id for i in claim.items) == sorted(ids)
    outcomes = [{"id": ids[0], "state": "succeeded", "result_code": "0", "ret_code": 0},
                {"id": ids[1], "state": "succeeded", "result_code": "0", "ret_code": 0},
                {"id": ids[2], "state": "failed", "result_code": "1008006", "ret_code": 1008026,
                 "error": "invalid_token"}]
    store.complete(claim.batch_id or "", outcomes, calls=1, items_sent=3, operator_type=2,
                   call_metrics=[("ok", 12.0)])
    store.heartbeat("w1")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = metric_values(r.text)
    assert m[("tpns_redis_up", ())] == 1
    assert m[("tpns_intents_enqueued_total", (("operator_type", "2"),))] == 3
    assert m[("tpns_intents_enqueued_total", (("operator_type", "5"),))] == 1
    assert m[("tpns_intents_completed_total",
              (("operator_type", "2"), ("outcome", "succeeded")))] == 2
    assert m[("tpns_intents_completed_total",
              (("operator_type", "2"), ("outcome", "failed")))] == 1
    assert m[("tpns_intents", (("operator_type", "2"), ("state", "sending")))] == 0
    assert m[("tpns_intents", (("operator_type", "5"), ("state", "queued")))] == 1
    assert m[("tpns_queue_depth", (("operator_type", "5"),))] == 1
    assert m[("tpns_queue_depth", (("operator_type", "2"),))] == 0
    assert m[("tpns_api_calls_total", (("operator_type", "2"), ("result", "ok")))] == 1
    assert m[("tpns_api_calls_total", (("operator_type", "2"), ("result", "transient")))] == 0
    # 12 ms: above the 10 ms bucket, inside 25 ms; buckets are cumulative and in seconds
    assert m[("tpns_api_call_duration_seconds_bucket", (("le", "0.01"),))] == 0
    assert m[("tpns_api_call_duration_seconds_bucket", (("le", "0.025"),))] == 1
    assert m[("tpns_api_call_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    assert m[("tpns_api_call_duration_seconds_count", ())] == 1
    assert m[("tpns_api_call_duration_seconds_sum", ())] == pytest.approx(0.012)
    assert m[("tpns_batch_size_items_bucket", (("le", "2.0"),))] == 0
    assert m[("tpns_batch_size_items_bucket", (("le", "5.0"),))] == 1
    assert m[("tpns_batch_size_items_bucket", (("le", "20.0"),))] == 1
    assert m[("tpns_batch_size_items_sum", ())] == 3
    assert m[("tpns_retries_total", (("operator_type", "2"),))] == 0
    assert m[("tpns_paused", (("app", "default"),))] == 0
    assert m[("tpns_leases_reclaimed_total", ())] == 0
    assert m[("tpns_workers_seen", ())] == 1
    assert m[("tpns_oldest_pending_age_seconds", ())] >= 0
    producer.store.pause("default", 30, "credentials:1008003")
    assert metric_values(client.get("/metrics").text)[("tpns_paused", (("app", "default"),))] == 1


def test_retries_are_counted(http: tuple[httpx.Client, Producer]) -> None:
    client, producer = http
    (intent_id,) = client.post("/v1/intents", json=OP4).json()["ids"]
    claim = producer.store.claim("default", 4)
    producer.store.complete(claim.batch_id or "", [{"id": intent_id, "state": "retry",
                                                    "error": "http_503", "delay_s": 60}],
                            calls=1, items_sent=1, operator_type=4,
                            call_metrics=[("transient", -1.0)])
    m = metric_values(client.get("/metrics").text)
    assert m[("tpns_retries_total", (("operator_type", "4"),))] == 1
    assert m[("tpns_api_calls_total", (("operator_type", "4"), ("result", "transient")))] == 1
    assert m[("tpns_queue_depth", (("operator_type", "4"),))] == 1
    assert m[("tpns_api_call_duration_seconds_count", ())] == 0  # no answer, no latency


# -- OpenAPI and the page -------------------------------------------------------------------------

def test_openapi_describes_every_route(http: tuple[httpx.Client, Producer]) -> None:
    client, _ = http
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    expected = {"/v1/intents": ("post", "get"), "/v1/intents/{intent_id}": ("get",),
                "/v1/events": ("get",), "/v1/stats": ("get",), "/healthz": ("get",),
                "/metrics": ("get",), "/openapi.json": ("get",), "/": ("get",),
                "/v1/overview": ("get",), "/v1/timeline": ("get",),
                "/v1/requeue-failed": ("post",), "/static/{name}": ("get",),
                "/signin": ("post",), "/signout": ("post",)}
    assert set(doc["paths"]) == set(expected)
    for path, methods in expected.items():
        for method in methods:
            operation = doc["paths"][path][method]
            assert operation["summary"] and operation["responses"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []


def test_the_status_page_escapes_what_it_shows(http: tuple[httpx.Client, Producer]) -> None:
    client, _ = http
    client.post("/v1/intents", json={"operator_type": 5, "account": "<b>eve</b>", "id": "x1"})
    page = client.get("/", params={"id": "x1"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "&lt;b&gt;eve&lt;/b&gt;" in page.text and "<b>eve" not in page.text
    missing = client.get("/", params={"id": '"><script>alert(1)</script>'})
    assert missing.status_code == 404
    assert "<script>" not in missing.text and "&lt;script&gt;" in missing.text


def test_a_worker_can_serve_the_same_metrics_on_its_own_port(
        http: tuple[httpx.Client, Producer]) -> None:
    from worker.monitor.metrics import start_metrics_server

    client, producer = http
    client.post("/v1/intents", json=OP4)
    server, thread = start_metrics_server(0, producer.store, ["default"])
    try:
        port = server.server_address[1]
        with httpx.Client(timeout=10) as direct:
            text = direct.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    m = metric_values(text)
    assert m[("tpns_intents_enqueued_total", (("operator_type", "4"),))] == 1
    assert m[("tpns_queue_depth", (("operator_type", "4"),))] == 1
