"""URL forms of worker/connections.py: Sentinel, TLS and unix sockets for the store and the broker."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from worker.connections import (
    SentinelTarget,
    celery_broker,
    is_redis_url,
    parse_sentinel_url,
    redis_client,
)
from worker.embedded import start_private
from worker.errors import ConfigError


def test_sentinel_url_full_form() -> None:
    target = parse_sentinel_url(
        "sentinel://:s3cr%40t@10.0.0.1:26379,10.0.0.2:26380,[::1]/mymaster/2"
        "?sentinel_password=sp")
    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26379)),
        master="mymaster", db=2, username=None, password="s3cr@t", sentinel_password="sp")
    assert "s3cr" not in repr(target) and "sp'" not in repr(target)


def test_sentinel_url_defaults_and_alias() -> None:
    target = parse_sentinel_url("redis+sentinel://user:pw@sentinel/cache")
    assert target.sentinels == (("sentinel", 26379),)
    assert (target.master, target.db, target.username, target.password) == ("cache", 0, "user", "pw")
    assert not target.ssl


def test_sentinel_url_tls_options() -> None:
    target = parse_sentinel_url("sentinel://h:26379/m/0?ssl_cert_reqs=CERT_OPTIONAL"
                                "&ssl_ca_certs=/ca.pem")
    assert target.ssl
    assert dict(target.ssl_options) == {"ssl_cert_reqs": "optional", "ssl_ca_certs": "/ca.pem"}
    assert parse_sentinel_url("sentinel://h/m?ssl=true").ssl


@pytest.mark.parametrize(("url", "words"), [
    ("sentinel://h1:26379", "master name"),
    ("sentinel:///mymaster", "at least one sentinel"),
    ("sentinel://h1:port/m", "bad port"),
    ("sentinel://h1:70000/m", "bad port"),
    ("sentinel://h1/m/zero", "db must be a number"),
    ("sentinel://h1/m/0/extra", "master name"),
    ("sentinel://h1/m?socket_timeout=1", "unknown Sentinel URL parameter"),
    ("sentinel://h1/m?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
])
def test_sentinel_url_errors_name_the_rule(url: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sentinel_url(url)
    assert words in str(info.value)
    assert "REDIS_URL" in str(info.value)


def test_broker_sentinel_is_kombus_form() -> None:
    url, options = celery_broker("sentinel://:pw@h1:26379,h2:26380/mymaster/3?sentinel_password=sp")
    assert url == "sentinel://:pw@h1:26379/3;sentinel://:pw@h2:26380/3"
    assert options == {"master_name": "mymaster", "sentinel_kwargs": {"password": "sp"}}


def test_broker_sentinel_tls() -> None:
    url, options = celery_broker("sentinel://h1,[::1]:26380/m?ssl_cert_reqs=none")
    assert url == "sentinel://h1:26379/0?ssl_cert_reqs=CERT_NONE;sentinel://[::1]:26380/0"
    assert options == {"master_name": "m",
                       "sentinel_kwargs": {"ssl": True, "ssl_cert_reqs": "none"}}


def test_broker_tls_checks_certificates_unless_told() -> None:
    # kombu alone would fall back to CERT_NONE for a rediss:// URL without ssl_cert_reqs
    assert celery_broker("rediss://:pw@r:6380/0") == (
        "rediss://:pw@r:6380/0?ssl_cert_reqs=CERT_REQUIRED", {})
    assert celery_broker("rediss://r:6380/0?ssl_cert_reqs=optional&ssl_ca_certs=/ca.pem") == (
        "rediss://r:6380/0?ssl_cert_reqs=CERT_OPTIONAL&ssl_ca_certs=%2Fca.pem", {})


def test_broker_pass_through_and_unix() -> None:
    assert celery_broker("redis://r:6379/1") == ("redis://r:6379/1", {})
    assert celery_broker("unix:///run/redis.sock") == ("redis+socket:///run/redis.sock", {})
    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    assert celery_broker(amqp) == (amqp, {})
    assert is_redis_url("sentinel://h/m") and is_redis_url("rediss://h")
    assert not is_redis_url(amqp)


def test_redis_client_tls_cert_reqs() -> None:
    client = redis_client("rediss://r:6380/0?ssl_cert_reqs=CERT_NONE")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "none"
    strict = redis_client("rediss://r:6380/0")
    assert strict.connection_pool.connection_kwargs["ssl_cert_reqs"] == "required"
    client.close()
    strict.close()


def test_redis_client_sentinel_builds_a_master_client() -> None:
    client = redis_client("sentinel://:pw@h1:26379,h2/mymaster/2?sentinel_password=sp&ssl=1",
                          socket_timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == "pw"
    manager = pool.sentinel_manager
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in manager.sentinels] == [("h1", 26379), ("h2", 26379)]
    first = manager.sentinels[0].connection_pool.connection_kwargs
    assert first["password"] == "sp" and first["socket_timeout"] == 3
    assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    client.close()


def test_redis_client_refuses_unknown_schemes() -> None:
    with pytest.raises(ConfigError):
        redis_client("http://r:6379")


def test_redis_client_plain(redis_url: str) -> None:
    client = redis_client(redis_url)
    try:
        assert isinstance(client, redis.Redis)
        assert client.ping()
    finally:
        client.close()


def test_redis_client_unix_socket_takes_the_tcp_options_it_cannot_use(tmp_path: Path) -> None:
    # a worker's store asks for TCP keepalive; on the embedded Redis's unix socket redis-py's
    # connection class would refuse the option at the first command
    proc, url = start_private(tmp_path / "r")
    try:
        client = redis_client(url, socket_keepalive=True, socket_keepalive_options={},
                              socket_timeout=5)
        try:
            assert url.startswith("unix://")
            assert client.ping()
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_broker_url_from_the_environment_keeps_kombus_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery reads CELERY_BROKER_URL from the environment before its configuration: a unix
    socket given there must still reach kombu as ``redis+socket://``, not as an unknown transport."""
    from worker.celery_app import base_celery

    monkeypatch.setenv("CELERY_BROKER_URL", "unix:///tmp/tpns-test.sock")
    app = base_celery("t", "unix:///tmp/tpns-test.sock", "q", "p:")
    assert app.conf.broker_url == "redis+socket:///tmp/tpns-test.sock"
