"""The status page's sign-in over HTTP (worker/serve/session.py, web.py): the session cookie's
attributes, what it opens, CSRF on state-changing requests, bearer scripts untouched, sign-out,
and the page's JSON routes (/v1/overview, /v1/timeline, /v1/requeue-failed)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.support.live_server import serving
from worker.producer import Producer
from worker.serve.app import create_app
from worker.serve.session import COOKIE, SESSION_TTL_S, Sessions
from worker.settings import Settings

TOKEN = "s3cr3t-page-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server(redis_url: str, prefix: str) -> Iterator[tuple[str, Producer]]:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_LINGER_MS": "0", "TPNS_API_TOKEN": TOKEN})
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
            serving(create_app(producer, settings)) as base:
        yield base, producer


@contextmanager
def sign_in(base: str) -> Iterator[tuple[httpx.Client, str, httpx.Response]]:
    """A client signed in through the form; its CSRF token (from the page) and the answer."""
    with httpx.Client(base_url=base, timeout=10) as client:
        answer = client.post("/signin", data={"token": TOKEN})
        page = client.get("/")
        found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page.text)
        assert page.status_code == 200 and found is not None
        yield client, found.group(1), answer


def fail_one(producer: Producer) -> str:
    [intent_id] = producer.submit_many([{"operator_type": 4, "token": "tok-f"}])
    claim = producer.store.claim("default", 4)
    assert claim.kind == "batch"
    producer.store.complete(claim.batch_id or "", [{"id": intent_id, "state": "failed",
                                                    "error": "invalid_token"}],
                            calls=1, items_sent=1, operator_type=4)
    return str(intent_id)


def test_signing_in_sets_an_httponly_strict_expiring_cookie_without_the_token(
        server: tuple[str, Producer]) -> None:
    base, _ = server
    with sign_in(base) as (client, csrf, answer):
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        cookie = answer.headers["set-cookie"]
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "max-age", "path"} <= attributes
        assert "samesite=strict" in cookie.lower() and f"max-age={SESSION_TTL_S}" in cookie.lower()
        assert "secure" not in attributes  # plain http on loopback: a Secure cookie would be lost
        assert TOKEN not in cookie
        page = client.get("/")
        assert TOKEN not in page.text and 'id="signout"' in page.text
        assert csrf not in cookie  # the CSRF token is not the cookie: another origin sees neither


def test_a_wrong_token_is_the_form_again_and_no_cookie(server: tuple[str, Producer]) -> None:
    base, _ = server
    with httpx.Client(base_url=base, timeout=10) as client:
        r = client.post("/signin", data={"token": TOKEN + "x"})
        assert r.status_code == 401 and "Wrong token." in r.text and "set-cookie" not in r.headers
        assert TOKEN not in r.text
        assert client.post("/signin", json={"token": TOKEN}).status_code == 415  # forms only
        assert client.get("/v1/overview").status_code == 401


def test_the_cookie_opens_the_page_its_data_and_the_events_stream(
        server: tuple[str, Producer]) -> None:
    base, producer = server
    failed = fail_one(producer)
    with sign_in(base) as (client, _, _):
        overview = client.get("/v1/overview")
        assert overview.status_code == 200
        assert [s["id"] for s in overview.json()["recent_failures"]] == [failed]
        timeline = client.get("/v1/timeline").json()
        assert sum(timeline["seconds"]["in"]) == 1 and sum(timeline["minutes"]["failed"]) == 1
        assert timeline["minutes"]["failures_by_reason"].keys() == {"invalid_token"}
        events = client.get("/v1/events", params={"follow": "false"})
        assert events.status_code == 200 and f'"id": "{failed}"' in events.text
        assert client.get(f"/v1/intents/{failed}").json()["state"] == "failed"
        # a forged or stale cookie opens nothing
        real = client.cookies[COOKIE]
        stale = real[:-1] + ("1" if real.endswith("0") else "0")  # one hex digit of the MAC off
        forged = httpx.get(f"{base}/v1/overview", cookies={COOKIE: stale}, timeout=10)
        assert forged.status_code == 401


def test_state_changes_from_the_cookie_need_the_csrf_token_bearer_needs_none(
        server: tuple[str, Producer]) -> None:
    base, producer = server
    failed = fail_one(producer)
    with sign_in(base) as (client, csrf, _):
        assert client.post("/v1/requeue-failed", json={}).status_code == 403
        assert client.post("/v1/requeue-failed", json={},
                           headers={"X-CSRF-Token": "0" * 64}).status_code == 403
        assert client.post("/v1/intents", json={"operator_type": 4, "token": "t2"}).status_code == 403
        assert producer.status(failed).state == "failed"  # type: ignore[union-attr]
        with sign_in(base) as (_, other_csrf, _):  # a token bound to another session fails
            assert client.post("/v1/requeue-failed", json={},
                               headers={"X-CSRF-Token": other_csrf}).status_code == 403
        r = client.post("/v1/requeue-failed", json={"error": "invalid_token"},
                        headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json() == {"requeued": 1, "ids": [failed]}
        # scripts: the bearer token, no cookie, no CSRF
        fail_again = httpx.post(f"{base}/v1/requeue-failed", headers=BEARER, json={}, timeout=10)
        assert fail_again.status_code == 200 and fail_again.json()["requeued"] == 0
        bad = httpx.post(f"{base}/v1/requeue-failed", content=b"[1]", timeout=10,
                         headers={**BEARER, "Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["field"] == "body"


def test_signing_out_clears_the_cookie(server: tuple[str, Producer]) -> None:
    base, _ = server
    with sign_in(base) as (client, csrf, _):
        assert client.post("/signout").status_code == 403  # without its CSRF token
        r = client.post("/signout", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json() == {"signed_out": True}
        assert "max-age=0" in r.headers["set-cookie"].lower()
        assert client.get("/v1/overview").status_code == 401
        assert 'action="/signin"' in client.get("/").text


def test_sessions_expire_and_die_with_a_new_token() -> None:
    now = [1_000_000.0]
    sessions = Sessions(TOKEN, clock=lambda: now[0])
    assert sessions.token_matches(TOKEN) and sessions.token_matches(f" {TOKEN}\n")
    assert not any(sessions.token_matches(t) for t in ("", TOKEN[:-1], TOKEN + "x"))
    cookie = sessions.issue()
    nonce = sessions.nonce(cookie)
    assert nonce is not None and sessions.csrf_matches(nonce, sessions.csrf(nonce))
    now[0] += SESSION_TTL_S + 1
    assert sessions.nonce(cookie) is None
    now[0] -= SESSION_TTL_S
    assert Sessions(TOKEN + "2", clock=lambda: now[0]).nonce(cookie) is None
    for broken in ("", "x", "1.2", f"{cookie}x", cookie.replace(".", "", 1)):
        assert sessions.nonce(broken) is None


def test_without_a_token_there_is_nothing_to_sign_in_to(redis_url: str, prefix: str) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix})
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
            serving(create_app(producer, settings)) as base:
        assert httpx.post(f"{base}/signin", data={"token": "x"}).status_code == 404
        page = httpx.get(f"{base}/")
        assert page.status_code == 200 and 'id="charts"' in page.text
        assert "csrf-token" not in page.text
        js = httpx.get(f"{base}/static/page.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert httpx.get(f"{base}/static/../app.py").status_code == 404
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "http" not in csp  # nothing from elsewhere


def test_another_sites_page_cannot_post_here_token_or_not(server: tuple[str, Producer],
                                                          redis_url: str, prefix: str) -> None:
    base, producer = server
    failed = fail_one(producer)
    evil = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    with sign_in(base) as (client, csrf, _):
        r = client.post("/v1/requeue-failed", json={}, headers={**evil, "X-CSRF-Token": csrf})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"]
        same = {"Origin": base, "X-CSRF-Token": csrf}  # the page's own fetch sends its origin
        assert client.post("/v1/requeue-failed", json={}, headers=same).json()["ids"] == [failed]
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix})
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as open_one, \
            serving(create_app(open_one, settings)) as open_base:
        # no token at all: still no target for a page elsewhere (form posts or JSON alike)
        r = httpx.post(f"{open_base}/v1/requeue-failed", content=b"{}", headers=evil)
        assert r.status_code == 403
        form = httpx.post(f"{open_base}/v1/requeue-failed", data={"x": "1"})
        assert form.status_code == 415  # not JSON: a cross-site form cannot send JSON
        assert httpx.post(f"{open_base}/v1/intents", json={"operator_type": 4, "token": "t9"},
                          headers={"Origin": "null"}).status_code == 403
        assert httpx.post(f"{open_base}/v1/requeue-failed", json={}).status_code == 200
