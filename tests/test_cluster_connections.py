"""Redis Cluster as the store: the URL forms, the broker rules at start-up, and a real
three-master cluster (``redis_cluster``) reached through ``redis+cluster://``."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from worker.connections import (
    ClusterTarget,
    async_redis_client,
    celery_broker,
    check_broker,
    is_cluster_url,
    is_redis_url,
    parse_cluster_url,
    redis_client,
)
from worker.errors import ConfigError
from worker.settings import Settings
from worker.tools.localcluster import LocalCluster


def test_cluster_url_full_form() -> None:
    target = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002/")
    assert target == ClusterTarget(nodes=(("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)),
                                   username="u", password="p@ss")
    assert "p@ss" not in repr(target)
    assert is_cluster_url("redis+cluster://h:1/") and is_redis_url("rediss+cluster://h:1/")
    assert not is_cluster_url("redis://h:1/0") and not is_cluster_url(None)


def test_cluster_url_tls_checks_certificates_unless_told() -> None:
    assert parse_cluster_url("rediss+cluster://h:7000/").ssl_options == (
        ("ssl_cert_reqs", "required"),)
    target = parse_cluster_url("rediss+cluster://h:7000/?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem")
    assert target.ssl and dict(target.ssl_options) == {"ssl_cert_reqs": "none",
                                                       "ssl_ca_certs": "/ca.pem"}


@pytest.mark.parametrize(("url", "words"), [
    ("redis+cluster:///", "at least one host:port"),
    ("redis+cluster://h:7000/3", "only db 0"),
    ("redis+cluster://h:notaport/", "bad port"),
    ("redis+cluster://h:7000/?ssl_cert_reqs=none", "needs rediss+cluster://"),
    ("redis+cluster://h:7000/?foo=1", "unknown Redis Cluster URL parameter 'foo'"),
])
def test_cluster_url_errors_name_the_rule(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match="REDIS_URL") as err:
        parse_cluster_url(url)
    assert words in str(err.value)


def test_a_cluster_is_never_the_broker() -> None:
    with pytest.raises(ConfigError, match=r"CELERY_BROKER_URL.*kombu has no cluster transport"):
        celery_broker("redis+cluster://h:7000/")
    with pytest.raises(ConfigError, match=r"CELERY_BROKER_URL.*cannot be a Redis Cluster"):
        check_broker("redis://h/0", "rediss+cluster://h:7000/")
    with pytest.raises(ConfigError, match=r"CELERY_BROKER_URL.*must be set"):
        check_broker("redis+cluster://h:7000/", None)
    check_broker("redis+cluster://h:7000/", "amqp://guest@rabbit//")
    check_broker("redis+cluster://h:7000/", "redis://wakes:6379/0")


def test_settings_refuse_a_cluster_broker_in_one_line() -> None:
    env = {"TPNS_ACCESS_ID": "1", "TPNS_SECRET_KEY": "s", "REDIS_URL": "redis+cluster://h:7000/"}
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert "CELERY_BROKER_URL" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot be a Redis Cluster"):
        Settings.from_env({**env, "CELERY_BROKER_URL": "redis+cluster://h:7000/"})
    settings = Settings.from_env({**env, "CELERY_BROKER_URL": "amqp://guest@rabbit//"})
    assert settings.redis_url == "redis+cluster://h:7000/"


def test_the_local_cluster_spreads_slots_over_three_masters(redis_cluster: LocalCluster) -> None:
    owners = {redis_cluster.port_of_slot(slot) for slot in (0, 8000, 16383)}
    assert owners == set(redis_cluster.ports) and len(owners) == 3


def test_redis_client_speaks_to_every_master(redis_cluster: LocalCluster,
                                             cluster_prefix: str) -> None:
    client = redis_client(redis_cluster.url, decode_responses=True)
    assert isinstance(client, RedisCluster)
    # keys whose hash tags land on different masters, all reached through one client
    keys = [f"{cluster_prefix}{{{tag}}}:x" for tag in ("a", "b", "c", "d", "e", "f")]
    ports = {redis_cluster.port_of_slot(client.keyslot(k)) for k in keys}
    assert len(ports) > 1
    for n, key in enumerate(keys):
        client.set(key, n)
    assert [client.get(k) for k in keys] == [str(n) for n in range(len(keys))]
    client.close()


def test_async_redis_client_reaches_the_cluster(redis_cluster: LocalCluster,
                                                cluster_prefix: str) -> None:
    async def roundtrip() -> str | None:
        client = async_redis_client(redis_cluster.url, decode_responses=True)
        assert isinstance(client, AsyncRedisCluster)
        await client.set(f"{cluster_prefix}{{a}}:y", "v")
        value = await client.get(f"{cluster_prefix}{{a}}:y")
        await client.aclose()
        return value
    assert asyncio.run(roundtrip()) == "v"


def test_settings_take_a_webhook_on_a_cluster_store() -> None:
    # one deliverer per app there (tests/test_webhooks.py drives them on a real cluster)
    env = {"REDIS_URL": "redis+cluster://h:7000/", "CELERY_BROKER_URL": "amqp://guest@rabbit//",
           "TPNS_WEBHOOK_URL": "https://hooks.example.com/tpns", "TPNS_WEBHOOK_SECRET": "s" * 32}
    assert Settings.from_env(env).webhook_url == "https://hooks.example.com/tpns"
