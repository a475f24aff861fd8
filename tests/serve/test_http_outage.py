"""``serve`` when Redis cannot answer (SPEC §3.7, §3.8): 503 with ``Retry-After`` and the ids by
fate, then 200 again once Redis is back, without a restart; and ``queue_full``. Over a real
socket, against a real redis-server the test kills and starts again."""

from __future__ import annotations

from pathlib import Path

import httpx
import redis

from tests.support.live_server import serving
from tests.support.redis_faults import private_redis
from worker.producer import Producer
from worker.serve.app import create_app
from worker.settings import Settings

PASSWORD = "pw-for-the-http-test"
OP4 = {"operator_type": 4, "token": "tok-a"}


def test_redis_killed_is_503_with_retry_after_and_the_server_recovers(tmp_path: Path) -> None:
    prefix = "tpnstest:http:"
    with private_redis(tmp_path / "redis", password=PASSWORD) as server:
        settings = Settings.from_env({"REDIS_URL": server.url, "TPNS_REDIS_PREFIX": prefix})
        with Producer(server.url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
                serving(create_app(producer, settings)) as base, \
                httpx.Client(base_url=base, timeout=30) as client:
            first = client.post("/v1/intents", json=OP4)
            assert first.status_code == 200
            first_id = first.json()["ids"][0]
            server.kill()
            body = [{**OP4, "id": "given"}, {"operator_type": 9}, {"operator_type": 4, "token": "b"}]
            down = client.post("/v1/intents", json=body)
            assert down.status_code == 503
            assert int(down.headers["Retry-After"]) >= 1
            answer = down.json()
            assert answer["code"] == "store_unavailable"
            assert answer["stored"] == [] and answer["in_doubt"] == []
            assert len(answer["refused"]) == 2 and answer["refused"][0] == "given"  # ids assigned
            assert [e["index"] for e in answer["errors"]] == [1]  # the input rules still answer
            assert PASSWORD not in down.text and "redis://:***@127.0.0.1" in answer["error"]
            solo = client.post("/v1/intents", json={**OP4, "id": "solo"})  # the group commit's door
            assert solo.status_code == 503 and int(solo.headers["Retry-After"]) >= 1
            alone = solo.json()  # written on the pooled connection before it was found dead: in doubt
            assert alone["code"] == "store_unavailable" and alone["stored"] == []
            assert alone["refused"] + alone["in_doubt"] == ["solo"]
            assert PASSWORD not in solo.text
            for path in (f"/v1/intents/{first_id}", "/v1/stats", "/"):
                r = client.get(path)
                assert r.status_code == 503, path
                assert "Retry-After" in r.headers and PASSWORD not in r.text
            assert client.get("/healthz").status_code == 503
            server.start()  # same port and AOF: the same server process answers again
            again = client.post("/v1/intents", json=OP4)
            assert again.status_code == 200 and again.json()["accepted"] == 1
            status = client.get(f"/v1/intents/{first_id}")
            assert status.status_code == 200 and status.json()["state"] == "queued"


def test_queue_full_is_503_with_retry_after(redis_url: str, prefix: str,
                                            rconn: redis.Redis) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_MAX_PENDING": "2"})
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
            serving(create_app(producer, settings)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/v1/intents", json=[{"operator_type": 4, "token": f"t{k}", "id": f"f{k}"}
                                             for k in range(3)])
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        answer = r.json()
        assert answer["code"] == "queue_full" and answer["error"].startswith("queue_full: ")
        assert answer["stored"] == ["f0", "f1"] and answer["refused"] == ["f2"]
        assert sorted(rconn.scan_iter(match=f"{prefix}i:*")) == [f"{prefix}i:f0", f"{prefix}i:f1"]
        schema = client.get("/openapi.json").json()["paths"]["/v1/intents"]["post"]["responses"]
        assert "Retry-After" in schema["503"]["headers"]
        assert set(schema["503"]["content"]["application/json"]["schema"]["required"]) >= {
            "stored", "refused", "in_doubt"}


def test_a_single_intent_post_refused_for_back_pressure_names_its_own_id(
        redis_url: str, prefix: str, rconn: redis.Redis) -> None:
    # one intent a request takes the group commit's door: its 503 is the same as an array's
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix,
                                  "TPNS_MAX_PENDING": "1"})
    with Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None) as producer, \
            serving(create_app(producer, settings)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        first = client.post("/v1/intents", json={**OP4, "id": "s0"})
        full = client.post("/v1/intents", json={"operator_type": 4, "token": "tok-b", "id": "s1"})
    assert first.status_code == 200 and first.json()["ids"] == ["s0"]
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
    assert full.headers["content-type"] == "application/json"
    answer = full.json()
    assert answer["code"] == "queue_full"
    assert answer["stored"] == [] and answer["refused"] == ["s1"] and answer["in_doubt"] == []
    assert answer["errors"] == []
    assert sorted(rconn.scan_iter(match=f"{prefix}i:*")) == [f"{prefix}i:s0"]
