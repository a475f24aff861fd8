"""worker.webhooks and worker.webhook_state against a real Redis and a real receiver (a socket).

The entries are appended as ``lib.lua``'s ``emit`` writes them; the deliverer runs in this process
(its threads), as it does in a worker's main process. End-to-end runs with worker processes are in
tests/integration/test_webhooks_e2e.py.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.polling import wait_until
from tests.support.webhook_receiver import WebhookReceiver, running
from tests.test_cluster_store import apps_on_two_masters
from worker.connections import redis_client
from worker.health import check
from worker.keys import EVENTS_ADDED_SUFFIX, Keys
from worker.monitor.metrics import make_registry, render
from worker.settings import Settings
from worker.store import Store
from worker.tools.localcluster import LocalCluster
from worker.webhook_state import WebhookState, lag_limits, read_figures, store_figures
from worker.webhooks import Deliverer, signature, start_deliverers

SECRET = "whsec-test-0123"


def append(client: Any, keys: Keys, n: int, maxlen: int | None = None,
           start: int = 0, app: str = "default") -> list[str]:
    """``n`` entries as emit() writes them; their stream ids."""
    out = []
    for k in range(start, start + n):
        pipe = client.pipeline(transaction=True)  # one step, as emit() in its script
        pipe.xadd(keys.events, {
            "id": f"i{k}", "app": app, "operator_type": 2, "state": "succeeded",
            "verified": "", "error": "", "result_code": "0", "ret_code": "0", "attempts": 1,
            "at": 1764064800000 + k}, maxlen=maxlen, approximate=False)
        pipe.incr(keys.events + EVENTS_ADDED_SUFFIX)  # emit() counts what it adds
        sid = pipe.execute()[0]
        out.append(sid.decode() if isinstance(sid, bytes) else sid)
    return out


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def receiver() -> Iterator[tuple[WebhookReceiver, str]]:
    yield from running(SECRET)


@pytest.fixture
def deliverers() -> Iterator[list[Deliverer]]:
    started: list[Deliverer] = []
    yield started
    for d in started:
        d.stop()


def test_the_signature_is_the_hex_hmac_sha256_of_the_body() -> None:
    body = b'[{"event":"intent"}]'
    assert signature("k", body) == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert signature("k", body) != signature("k2", body)


def test_delivers_from_the_stream_end_in_order_signed_at_most_100_per_post(
        client: redis.Redis, prefix: str, receiver: tuple[WebhookReceiver, str],
        deliverers: list[Deliverer]) -> None:
    hook, url = receiver
    keys = Keys(prefix)
    before = append(client, keys, 3)  # a backlog from before the webhook existed: not sent
    d = Deliverer(client, keys, url, SECRET, name="t1")
    deliverers.append(d.start())
    wait_until(lambda: WebhookState(client, keys).cursor() is not None, 10,
               message="the first leader set the cursor")
    assert WebhookState(client, keys).cursor() == (before[-1], 3)
    sent = append(client, keys, 250, start=3)
    wait_until(lambda: (read_figures(client, keys) or {}).get("delivered") == 250, 30,
               message="250 events delivered and the cursor moved")
    requests = hook.snapshot()
    assert all(r.signed for r in requests)
    assert all(1 <= len(r.items) <= 100 for r in requests)
    got = [item["stream_id"] for item in hook.delivered()]
    assert got == sent
    assert hook.delivered()[0] == {
        "event": "intent", "stream_id": sent[0], "id": "i3", "app": "default",
        "operator_type": 2, "state": "succeeded", "verified": None, "error": None,
        "result_code": "0", "ret_code": 0, "attempts": 1, "at": "2025-11-25T10:00:00.003Z"}
    figures = read_figures(client, keys)
    assert figures is not None
    assert (figures["lag_events"], figures["lag_exact"], figures["delivered"]) == (0, True, 250)
    assert figures["cursor"] == sent[-1] and figures["leader"] == "t1"
    assert figures["last_delivered_at"] is not None and figures["failures"] == 0


def test_a_stale_leader_cannot_move_the_cursor(client: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    sids = append(client, keys, 3)
    old = WebhookState(client, keys, name="old")
    assert old.acquire() and old.start() == (sids[-1], 3)
    follower = WebhookState(client, keys, name="new")
    assert not follower.acquire()  # one leader at a time
    client.delete(keys.webhook_lease)  # the old leader's lease ran out (it stalled)
    assert follower.acquire()
    new = append(client, keys, 2, start=3)
    assert old.advance(new[0], 4, 1, 0) == 0  # fenced: not the lease's holder
    assert not old.held and not old.renew()
    assert follower.cursor() == (sids[-1], 3)
    assert follower.advance(new[1], 5, 2, 0) == 1
    assert follower.advance(new[0], 4, 1, 0) == -1  # never backwards
    assert follower.cursor() == (new[1], 5)
    follower.release()
    assert client.get(keys.webhook_lease) is None


def test_a_clean_stop_hands_the_lease_over_at_once(client: redis.Redis, prefix: str,
                                                    receiver: tuple[WebhookReceiver, str]) -> None:
    _, url = receiver
    keys = Keys(prefix)
    d = Deliverer(client, keys, url, SECRET, name="t1").start()
    wait_until(lambda: client.get(keys.webhook_lease), 10, message="a leader")
    d.stop()
    assert client.get(keys.webhook_lease) is None  # released, not left to expire
    assert WebhookState(client, keys, name="t2").acquire()


def test_non_2xx_is_retried_with_backoff_and_counted(
        client: redis.Redis, prefix: str, receiver: tuple[WebhookReceiver, str],
        deliverers: list[Deliverer], redis_url: str) -> None:
    hook, url = receiver
    hook.statuses = [500, 503]
    keys = Keys(prefix)
    d = Deliverer(client, keys, url, SECRET, name="t1", backoff_max_s=0.2)
    deliverers.append(d.start())
    wait_until(lambda: WebhookState(client, keys).cursor() is not None, 10,
               message="the cursor set")
    sent = append(client, keys, 5)
    wait_until(lambda: (read_figures(client, keys) or {}).get("delivered") == 5, 30,
               message="delivered after the retries")
    requests = hook.snapshot()
    assert [r.status for r in requests[:3]] == [500, 503, 200]
    assert requests[0].items == requests[1].items == requests[2].items  # the same body again
    assert [i["stream_id"] for i in hook.delivered()] == sent
    figures = read_figures(client, keys)
    assert figures is not None
    assert (figures["failures"], figures["last_error"], figures["delivered"]) == (2, "HTTP 503", 5)
    metrics = render(make_registry(Store(client, prefix), lambda: ["default"])).decode()
    assert "tpns_webhook_failures_total 2.0" in metrics
    assert "tpns_webhook_delivered_total 5.0" in metrics
    assert "tpns_webhook_lag_events 0.0" in metrics


def test_events_trimmed_before_delivery_arrive_as_one_gap(
        client: redis.Redis, prefix: str, receiver: tuple[WebhookReceiver, str],
        deliverers: list[Deliverer]) -> None:
    hook, url = receiver
    keys = Keys(prefix)
    hook.statuses = [503] * 1000  # the receiver is down while the stream overflows
    d = Deliverer(client, keys, url, SECRET, name="t1", backoff_max_s=0.1)
    deliverers.append(d.start())
    wait_until(lambda: WebhookState(client, keys).cursor() is not None, 10,
               message="the cursor set")
    first = append(client, keys, 1)
    wait_until(lambda: len(hook.snapshot()) >= 2, 10, message="the first event's POST failing")
    # while the deliverer retries that POST, the stream overflows its cap of 5
    sent = first + append(client, keys, 30, maxlen=5, start=1)
    store = Store(client, prefix)
    limits = lag_limits("http://x", 40)  # degraded over 4, unhealthy over 20
    assert limits == (4, 20)
    lagging = check(store, lambda: ["default"], need_worker=False, webhook_limits=limits)
    assert not lagging.ok and lagging.reason.startswith("webhook lag 31 events")
    hook.statuses.clear()
    wait_until(lambda: (read_figures(client, keys) or {}).get("cursor") == sent[-1], 30,
               message="the entries kept delivered")
    items = hook.delivered()
    assert [i["event"] for i in items] == ["intent", "gap"] + ["intent"] * 5
    assert items[0]["stream_id"] == first[0]
    # nothing skipped silently: the gap runs from the last delivered to the first kept
    assert (items[1]["from_id"], items[1]["first_id"]) == (first[0], sent[-5])
    assert "app" not in items[1] and "cursor" not in items[1]  # one stream: as it always was
    assert [i["stream_id"] for i in items[2:]] == sent[-5:]
    figures = read_figures(client, keys)
    assert figures is not None and figures["gaps"] == 1 and figures["lag_events"] == 0
    healthy = check(store, lambda: ["default"], need_worker=False, webhook_limits=limits)
    assert healthy.ok and not healthy.degraded and healthy.webhook_lag == 0


def test_health_says_degraded_between_the_two_limits(client: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    append(client, keys, 1)
    state = WebhookState(client, keys, name="t1")
    assert state.acquire()
    state.start()
    append(client, keys, 6, start=1)
    verdict = check(Store(client, prefix), lambda: ["default"], need_worker=False,
                    webhook_limits=(4, 20))
    assert verdict.ok and verdict.webhook_lag == 6
    assert verdict.line().startswith("degraded: webhook lag 6 events (last delivered never)")
    body: dict[str, Any] = verdict.to_dict()
    assert body["ok"] is True and body["webhook_lag_events"] == 6 and "degraded" in body


def test_on_a_cluster_each_app_has_its_deliverer_cursor_and_order(
        redis_cluster: LocalCluster, cluster_prefix: str, receiver: tuple[WebhookReceiver, str],
        deliverers: list[Deliverer]) -> None:
    hook, url = receiver
    client = redis_client(redis_cluster.url)
    one, two = apps_on_two_masters(redis_cluster, client)
    settings = Settings.from_env({
        "TPNS_BASE_URL": "http://127.0.0.1:9", "TPNS_APPS": f"{one},{two}",
        "TPNS_REDIS_PREFIX": cluster_prefix, "TPNS_WEBHOOK_URL": url,
        "TPNS_WEBHOOK_SECRET": SECRET})
    started = start_deliverers(settings, redis_cluster.url)
    deliverers.extend(started)
    assert len(started) == 2  # one per app: each app's stream, lease and cursor in its slot
    store = Store(client, cluster_prefix)
    assert store.cluster

    def figures() -> dict[str, Any]:
        return store_figures(store, [one, two]) or {}

    wait_until(lambda: len(figures().get("apps", {})) == 2, 20, message="both cursors set")
    keys = Keys(cluster_prefix)
    sent = {app: append(client, keys.tagged(app), 30, app=app) for app in (one, two)}
    wait_until(lambda: figures().get("delivered") == 60, 30, message="60 events delivered")
    assert all(r.signed for r in hook.snapshot())
    for app in (one, two):
        assert [i["stream_id"] for i in hook.delivered() if i["app"] == app] == sent[app]
    done = figures()
    assert (done["lag_events"], done["gaps"], done["failures"]) == (0, 0, 0)
    assert {app: f["delivered"] for app, f in done["apps"].items()} == {one: 30, two: 30}
    client.close()


def test_on_a_cluster_a_gap_names_the_app_whose_stream_lost_the_entries(
        redis_cluster: LocalCluster, cluster_prefix: str, receiver: tuple[WebhookReceiver, str],
        deliverers: list[Deliverer]) -> None:
    hook, url = receiver
    client = redis_client(redis_cluster.url)
    one, _ = apps_on_two_masters(redis_cluster, client)
    keys = Keys(cluster_prefix).tagged(one)
    first = append(client, keys, 1, app=one)
    state = WebhookState(client, keys, name="earlier")
    assert state.acquire() and state.start() == (first[0], 1)  # delivered up to here
    state.release()
    kept = append(client, keys, 12, maxlen=5, start=1, app=one)[-5:]  # 6 lost before delivery
    deliverers.append(Deliverer(client, keys, url, SECRET, name="t1", app=one).start())
    wait_until(lambda: (read_figures(client, keys) or {}).get("cursor") == kept[-1], 30,
               message="the entries kept delivered")
    items = hook.delivered()
    assert [i["event"] for i in items] == ["gap"] + ["intent"] * 5
    assert (items[0]["app"], items[0]["from_id"], items[0]["first_id"]) == (one, first[0], kept[0])
    assert "cursor" not in items[0] and [i["stream_id"] for i in items[1:]] == kept
    deliverers.pop().stop()  # before its client is closed
    client.close()
