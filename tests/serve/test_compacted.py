"""A compacted status (issue 16: a succeeded intent past ``TPNS_STATUS_DETAIL_S``) through
``serve``: ``GET /v1/intents/{id}``, history by key and the status page, each within the
OpenAPI document, over a real socket against a real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis

from tests.support.live_server import serving
from tests.support.summaries import PAYLOAD_FIELDS, settle
from worker.producer import Producer
from worker.serve.app import create_app
from worker.serve.openapi import openapi_schema
from worker.settings import Settings

SCHEMA = schemathesis.openapi.from_dict(openapi_schema())
LOGIN = {"operator_type": 2, "token": "tok-c", "account_list": [{"account": "c@example.com"}],
         "id": "login-1"}
ALL_OUT = {"operator_type": 5, "account": "c@example.com", "id": "out-1"}


@pytest.fixture
def compacted(redis_url: str, prefix: str) -> Iterator[tuple[httpx.Client, Producer]]:
    """A server whose store keeps no whole record of a succeeded intent, with LOGIN and ALL_OUT
    enqueued through it and succeeded."""
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_LINGER_MS": "0", "TPNS_STATUS_DETAIL_S": "0"})
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
            serving(create_app(producer, settings)) as base, \
            httpx.Client(base_url=base, timeout=10) as client:
        posted = client.post("/v1/intents", json=[LOGIN, ALL_OUT])
        assert posted.json()["ids"] == ["login-1", "out-1"]
        settle(producer.store)
        yield client, producer


def test_the_status_of_a_compacted_intent_says_so_within_the_document(
        compacted: tuple[httpx.Client, Producer]) -> None:
    client, _ = compacted
    route = SCHEMA["/v1/intents/{intent_id}"]["GET"]
    for intent_id, op in (("login-1", 2), ("out-1", 5)):
        r = client.get(f"/v1/intents/{intent_id}")
        assert r.status_code == 200
        body = r.json()
        assert (body["id"], body["operator_type"], body["state"], body["detail"]) == (
            intent_id, op, "succeeded", "compacted")
        assert not set(PAYLOAD_FIELDS) & set(body), body
        route.validate_response(r)  # raises if the document does not allow it
    status = openapi_schema()["paths"]["/v1/intents/{intent_id}"]["get"]["responses"]["200"]
    props = status["content"]["application/json"]["schema"]["properties"]
    assert props["detail"]["enum"] == ["compacted"]
    assert not {"token", "account_list", "account", "account_type", "detail"} & set(
        status["content"]["application/json"]["schema"]["required"])


def test_history_by_key_lists_compacted_intents_within_the_document(
        compacted: tuple[httpx.Client, Producer]) -> None:
    client, producer = compacted
    client.post("/v1/intents", json={**LOGIN, "id": "login-2", "operator_type": 3})
    r = client.get("/v1/intents", params={"token": "tok-c"})
    assert r.status_code == 200
    got = [(s["id"], s["state"], s.get("detail")) for s in r.json()["intents"]]
    assert got == [("login-2", "queued", None), ("login-1", "succeeded", "compacted")]
    SCHEMA["/v1/intents"]["GET"].validate_response(r)
    by_account = client.get("/v1/intents", params={"account": "c@example.com"})
    assert [s["id"] for s in by_account.json()["intents"]] == ["login-2", "out-1", "login-1"]
    SCHEMA["/v1/intents"]["GET"].validate_response(by_account)
    assert producer.status("login-2") is not None


def test_the_status_page_shows_a_compacted_intent(compacted: tuple[httpx.Client, Producer]
                                                  ) -> None:
    client, _ = compacted
    page = client.get("/", params={"id": "login-1"})
    assert page.status_code == 200
    assert "compacted" in page.text and "tok-c" not in page.text
