"""Redis connections from one URL, for the store (redis-py) and for the Celery broker (kombu).

Accepted forms of ``REDIS_URL`` (and of ``CELERY_BROKER_URL`` when it names a Redis):

* ``redis://[[user]:password@]host[:port][/db]`` and ``unix:///path/to/redis.sock[?db=N]``;
* ``rediss://…`` (TLS). Certificate checking follows ``ssl_cert_reqs`` in the query
  (``required``, the default, ``optional`` or ``none``; kombu's ``CERT_REQUIRED`` spelling works
  too), with ``ssl_ca_certs``, ``ssl_certfile`` and ``ssl_keyfile`` alongside. kombu alone would
  default a ``rediss://`` broker to *no* certificate check; here both sides default to ``required``.
* Sentinel: ``sentinel://[[user]:password@]host1[:26379][,host2[:26379]…]/master_name[/db]``
  (``redis+sentinel://`` is the same). The password is the master's; the sentinels' own password
  goes in the query as ``sentinel_password``. ``?ssl=true`` (or any ``ssl_*`` parameter) speaks TLS
  to the master and the sentinels. kombu spells the same target
  ``sentinel://host1:26379;sentinel://host2:26379`` with the transport option ``master_name``;
  :func:`celery_broker` produces that form, so one URL configures both.

* Redis Cluster: ``redis+cluster://[[user]:password@]host1:port1[,host2:port2…]/`` (a few masters
  as start-up nodes; the client learns the rest), ``rediss+cluster://`` for TLS with the same
  ``ssl_*`` query parameters as ``rediss://``. The store only: kombu has no cluster transport, so
  :func:`celery_broker` refuses it and ``CELERY_BROKER_URL`` must name RabbitMQ or a standalone
  Redis (``check_broker``).

Any other broker URL (``amqp://``, ``pyamqp://``, …) goes to Celery untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from .errors import ConfigError

SENTINEL_SCHEMES = ("sentinel", "redis+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket", *SENTINEL_SCHEMES, *CLUSTER_SCHEMES)
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379

#: ``ssl_cert_reqs`` spellings (redis-py's and kombu's) -> redis-py's
_CERT_REQS = {"required": "required", "cert_required": "required",
              "optional": "optional", "cert_optional": "optional",
              "none": "none", "cert_none": "none"}
_TRUE = ("1", "true", "yes", "on")
#: connection options of TCP alone, dropped for a unix socket (the embedded Redis)
_TCP_ONLY = ("socket_keepalive", "socket_keepalive_options")


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False
    #: ``ssl_*`` options (``ssl_cert_reqs`` normalised to redis-py's spelling)
    ssl_options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ClusterTarget:
    """A parsed ``redis+cluster://`` URL."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_options: tuple[tuple[str, str], ...] = ()


def scheme_of(url: str) -> str:
    return url.partition("://")[0].lower()


def is_cluster_url(url: str | None) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url is not None and scheme_of(url) in CLUSTER_SCHEMES


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis (plain, TLS, unix socket or Sentinel)."""
    return scheme_of(url) in REDIS_SCHEMES


def _cert_reqs(value: str) -> str:
    try:
        return _CERT_REQS[value.strip().lower()]
    except KeyError:
        raise ConfigError("REDIS_URL", f"ssl_cert_reqs must be required, optional or none, "
                                       f"got {value!r}") from None


def _host_port(part: str, default_port: int = DEFAULT_SENTINEL_PORT,
               what: str = "sentinel") -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if part.startswith("["):
        host, _, rest = part[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
    if not host:
        raise ConfigError("REDIS_URL", f"{what} address {part!r} has no host")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError("REDIS_URL", f"{what} address {part!r} has a bad port") from None
    if not 0 < port < 65536:
        raise ConfigError("REDIS_URL", f"{what} address {part!r} has a bad port")
    return host, port


def _credentials(netloc: str) -> tuple[str | None, str | None, str]:
    """``[[user]:password@]hosts`` of a multi-host URL (which urllib cannot parse) as
    (username, password, hosts); an empty user or password is None."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, hosts
    user_text, colon, pass_text = userinfo.partition(":")
    return (unquote(user_text) or None, unquote(pass_text) if colon and pass_text else None,
            hosts)


def parse_cluster_url(url: str) -> ClusterTarget:
    """Parse ``redis+cluster://[[user]:password@]h1[:p1][,h2[:p2]…][/][?ssl_*=…]``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ConfigError("REDIS_URL", "a Redis Cluster URL starts with redis+cluster:// or "
                                       "rediss+cluster://")
    netloc, _, path_query = rest.partition("/")
    if "?" in netloc:  # no slash before the query
        netloc, _, query = netloc.partition("?")
        path = ""
    else:
        path, _, query = path_query.partition("?")
    if path.strip("/") not in ("", "0"):
        raise ConfigError("REDIS_URL", "a Redis Cluster has only db 0: end the URL in / "
                                       f"(got /{path})")
    username, password, hosts = _credentials(netloc)
    nodes = tuple(_host_port(h.strip(), DEFAULT_REDIS_PORT, "cluster node")
                  for h in hosts.split(",") if h.strip())
    if not nodes:
        raise ConfigError("REDIS_URL", "a Redis Cluster URL needs at least one host:port")
    use_ssl = scheme.lower() == "rediss+cluster"
    ssl_options: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if not key.startswith("ssl_"):
            raise ConfigError("REDIS_URL", f"unknown Redis Cluster URL parameter {key!r} "
                                           f"(known: ssl_*)")
        if not use_ssl:
            raise ConfigError("REDIS_URL", f"{key} needs rediss+cluster:// (TLS)")
        ssl_options.append((key, _cert_reqs(value) if key == "ssl_cert_reqs" else value))
    if use_ssl and not any(k == "ssl_cert_reqs" for k, _ in ssl_options):
        ssl_options.append(("ssl_cert_reqs", "required"))
    return ClusterTarget(nodes=nodes, username=username, password=password, ssl=use_ssl,
                         ssl_options=tuple(ssl_options))


def check_broker(redis_url: str | None, broker_url: str | None) -> None:
    """Refuse what cannot carry the wakes: a cluster as the broker (kombu has no cluster
    transport), or a cluster store with no ``CELERY_BROKER_URL`` (the broker would default to it)."""
    if is_cluster_url(broker_url):
        raise ConfigError("CELERY_BROKER_URL", "cannot be a Redis Cluster (kombu has no cluster "
                                               "transport): use RabbitMQ (amqp://) or a "
                                               "standalone Redis (redis://)")
    if is_cluster_url(redis_url) and not broker_url:
        raise ConfigError("CELERY_BROKER_URL", "must be set when REDIS_URL is a Redis Cluster "
                                               "(RabbitMQ amqp:// or a standalone redis://)")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``sentinel://[[user]:password@]h1[:p1][,h2[:p2]…]/master[/db][?query]``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ConfigError("REDIS_URL", "a Sentinel URL starts with sentinel://")
    netloc, _, path_query = rest.partition("/")
    path, _, query = path_query.partition("?")
    username, password, hosts = _credentials(netloc)
    sentinels = tuple(_host_port(h.strip()) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ConfigError("REDIS_URL", "a Sentinel URL needs at least one sentinel host:port")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ConfigError("REDIS_URL", "a Sentinel URL ends in /<master name>[/<db>]")
    master = unquote(parts[0])
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ConfigError("REDIS_URL", f"the Sentinel URL's db must be a number, "
                                       f"got {parts[1]!r}") from None
    params = dict(parse_qsl(query, keep_blank_values=True))
    sentinel_password = params.pop("sentinel_password", None) or None
    use_ssl = params.pop("ssl", "").lower() in _TRUE
    ssl_options: list[tuple[str, str]] = []
    for key, value in params.items():
        if not key.startswith("ssl_"):
            raise ConfigError("REDIS_URL", f"unknown Sentinel URL parameter {key!r} (known: "
                                           f"sentinel_password, ssl, ssl_*)")
        ssl_options.append((key, _cert_reqs(value) if key == "ssl_cert_reqs" else value))
        use_ssl = True
    return SentinelTarget(sentinels=sentinels, master=master, db=db, username=username,
                          password=password, sentinel_password=sentinel_password,
                          ssl=use_ssl, ssl_options=tuple(ssl_options))


def _with_cert_reqs(url: str, spelling: dict[str, str] | None = None) -> str:
    """A ``rediss://`` URL whose ``ssl_cert_reqs`` is explicit (``required`` when absent)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    out: list[tuple[str, str]] = []
    found = False
    for key, value in query:
        if key == "ssl_cert_reqs":
            found = True
            value = _cert_reqs(value)
            value = spelling[value] if spelling else value
        out.append((key, value))
    if not found:
        out.append(("ssl_cert_reqs", spelling["required"] if spelling else "required"))
    return urlunsplit(parts._replace(query=urlencode(out)))


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for any accepted ``REDIS_URL`` (``kwargs`` go to the connections)."""
    client: redis.Redis = _client(url, redis.Redis, Sentinel, kwargs)
    return client


def async_redis_client(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """``redis_client`` on ``redis.asyncio`` (for ``AsyncProducer``): the same URLs, the same
    options."""
    client: redis.asyncio.Redis = _client(url, redis.asyncio.Redis, AsyncSentinel, kwargs)
    return client


def _cluster_client(url: str, asynchronous: bool, kwargs: dict[str, Any]) -> Any:
    target = parse_cluster_url(url)
    conn: dict[str, Any] = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_CLUSTER}
    if target.ssl:
        conn.update({"ssl": True, **dict(target.ssl_options)})
    if asynchronous:
        from redis.asyncio.cluster import ClusterNode as AsyncNode
        from redis.asyncio.cluster import RedisCluster as AsyncCluster
        return AsyncCluster(startup_nodes=[AsyncNode(h, p) for h, p in target.nodes],
                            username=target.username, password=target.password, **conn)
    from redis.cluster import ClusterNode, RedisCluster
    nodes = [ClusterNode(h, p) for h, p in target.nodes]  # type: ignore[no-untyped-call]
    return RedisCluster(startup_nodes=nodes,
                        username=target.username, password=target.password, **conn)


#: connection options a cluster client takes otherwise (or not at all): it has no pool to share
#: and keeps one per node
_NOT_FOR_CLUSTER = ("connection_pool", "db")


def _client(url: str, client_class: Any, sentinel_class: Any, kwargs: dict[str, Any]) -> Any:
    scheme = scheme_of(url)
    if scheme in CLUSTER_SCHEMES:
        return _cluster_client(url, client_class is redis.asyncio.Redis, kwargs)
    if scheme in SENTINEL_SCHEMES:
        target = parse_sentinel_url(url)
        conn: dict[str, Any] = dict(kwargs)
        sentinel_kwargs: dict[str, Any] = {k: v for k, v in kwargs.items()
                                           if k.startswith("socket_")}
        if target.sentinel_password:
            sentinel_kwargs["password"] = target.sentinel_password
        if target.ssl:
            tls = {"ssl": True, **dict(target.ssl_options)}
            conn.update(tls)
            sentinel_kwargs.update(tls)
        sentinel = sentinel_class(list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **conn)
        return sentinel.master_for(target.master, db=target.db, username=target.username,
                                   password=target.password)
    if scheme == "rediss":
        url = _with_cert_reqs(url)
    elif scheme == "unix":  # redis-py's unix socket connection refuses the TCP-only options
        kwargs = {k: v for k, v in kwargs.items() if k not in _TCP_ONLY}
    elif scheme != "redis":
        raise ConfigError("REDIS_URL", "must start with redis://, rediss://, unix://, "
                                       "sentinel:// or redis+cluster://")
    return client_class.from_url(url, **kwargs)


#: redis-py ``ssl_cert_reqs`` -> the spelling kombu's URL parser maps to an ``ssl`` constant
_KOMBU_CERT_REQS = {"required": "CERT_REQUIRED", "optional": "CERT_OPTIONAL", "none": "CERT_NONE"}


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """``(broker_url, broker_transport_options)`` for Celery from a ``REDIS_URL``-style URL.

    Redis forms become kombu's spelling (unix sockets as ``redis+socket://``, Sentinel as a
    ``;``-separated list plus ``master_name``, ``rediss://`` with an explicit certificate check);
    anything else (RabbitMQ's ``amqp://``) is returned as is, with no transport options.
    """
    scheme = scheme_of(url)
    if scheme in CLUSTER_SCHEMES:
        check_broker(None, url)
    if scheme == "unix":
        return "redis+socket://" + url.partition("://")[2], {}
    if scheme == "rediss":
        return _with_cert_reqs(url, _KOMBU_CERT_REQS), {}
    if scheme not in SENTINEL_SCHEMES:
        return url, {}
    target = parse_sentinel_url(url)
    auth = ""
    if target.username or target.password:
        auth = quote(target.username or "", safe="") + (
            ":" + quote(target.password, safe="") if target.password else "") + "@"
    query = ""
    if target.ssl:
        # kombu reads ssl_* from the first URL's query into Connection(ssl=…) for the master
        opts = dict(target.ssl_options)
        opts["ssl_cert_reqs"] = _KOMBU_CERT_REQS[opts.get("ssl_cert_reqs", "required")]
        query = "?" + urlencode(opts)
    urls = []
    for k, (host, port) in enumerate(target.sentinels):
        shown = f"[{host}]" if ":" in host else host
        urls.append(f"sentinel://{auth}{shown}:{port}/{target.db}" + (query if k == 0 else ""))
    options: dict[str, Any] = {"master_name": target.master}
    sentinel_kwargs: dict[str, Any] = {}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    if target.ssl:
        sentinel_kwargs["ssl"] = True
        sentinel_kwargs.update(target.ssl_options)  # redis-py's spelling: kombu passes it on
    if sentinel_kwargs:
        options["sentinel_kwargs"] = sentinel_kwargs
    return ";".join(urls), options
