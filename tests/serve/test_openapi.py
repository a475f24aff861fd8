"""Schema-driven fuzzing of ``tpns-batcher serve`` from its own ``/openapi.json`` (schemathesis).

Every route that answers and closes is called over a real socket with generated requests, with no
token configured, and with ``TPNS_API_TOKEN`` set (both with the right bearer and with none).
Checks: never a 5xx, the status code is one the document lists, and the body conforms to the
response schema and its content type. The example count follows the hypothesis profile
(``TPNS_TEST_PROFILE=extended`` runs many more).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.fuzz import examples
from tests.support.live_server import serving
from worker.producer import Producer
from worker.serve.app import create_app
from worker.serve.openapi import openapi_schema
from worker.settings import Settings

TOKEN = "s3cret-token-for-the-fuzz"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]



@schemathesis.serializer("application/x-ndjson", "application/jsonl")
def _json_lines(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A JSON Lines body as its schema says: a string, sent as UTF-8 (surrogates kept as bytes)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.encode("utf-8", "surrogatepass")


schema = schemathesis.openapi.from_dict(openapi_schema())


@pytest.fixture(params=["open", "token", "no token sent"])
def server(request: pytest.FixtureRequest, redis_url: str, prefix: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A real server on the test's Redis and prefix; yields its URL and the headers to send."""
    env = {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix, "TPNS_LINGER_MS": "0"}
    if request.param != "open":
        env["TPNS_API_TOKEN"] = TOKEN
    settings = Settings.from_env(env)
    headers = {"Authorization": f"Bearer {TOKEN}"} if request.param == "token" else {}
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
            serving(create_app(producer, settings)) as base:
        producer.store.heartbeat("fuzz:1")  # a worker was seen: /healthz answers 200, not 503
        yield base, headers


def test_the_served_document_is_the_one_fuzzed(server: tuple[str, dict[str, str]],
                                               request: pytest.FixtureRequest) -> None:
    base, headers = server
    r = httpx.get(f"{base}/openapi.json", headers=headers, timeout=10)
    if request.node.callspec.params["server"] == "no token sent":
        assert r.status_code == 401
    else:
        assert r.status_code == 200 and r.json() == openapi_schema()


@schema.parametrize()
@settings(max_examples=examples(10, 300), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@pytest.mark.timeout(examples(180, 1800))
def test_every_route_answers_within_its_schema(case: schemathesis.Case,
                                               server: tuple[str, dict[str, str]]) -> None:
    base, headers = server
    if case.path == "/v1/events":  # fuzzed too, but as a stream that closes (follow=false)
        case.query = {**(case.query or {}), "follow": "false"}
    case.call_and_validate(base_url=base, headers={**(case.headers or {}), **headers}, checks=CHECKS,
                           timeout=30)
