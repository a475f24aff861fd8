"""Settings: one frozen, typed object built once from the environment and an optional env file.

Nothing reads the environment at import time. ``Settings.from_env()`` reads, in order of strength:
the process environment, then the file named by ``TPNS_CONFIG_FILE`` (default
``config/tpns-batcher.env`` when it exists), then the defaults below (SPEC §7). A bad value raises
``ConfigError`` whose text is one line naming the variable and the rule.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .connections import check_broker
from .errors import ConfigError
from .keys import DEFAULT_PREFIX

#: the service URL of each TPNS access point (data is isolated per access point)
REGION_URLS: dict[str, str] = {
    "guangzhou": "https://api.tpns.tencent.com",
    "shanghai": "https://api.tpns.sh.tencent.com",
    "hongkong": "https://api.tpns.hk.tencent.com",
    "singapore": "https://api.tpns.sgp.tencent.com",
}

#: the sandbox's documented credentials, used by a worker pointed at an explicit ``TPNS_BASE_URL``
#: without credentials. Like a payment provider's test keys: public on purpose. The sandbox declares
#: its own copy (worker.sandbox.auth: the core may not import it); tests/sandbox/test_auth.py pins
#: that the two agree.
SANDBOX_ACCESS_ID = "1500000001"
SANDBOX_SECRET_KEY = "sandbox-secret-0123456789abcdef"

DEFAULT_CONFIG_FILE = Path("config") / "tpns-batcher.env"
#: the Celery pool of ``tpns-batcher worker`` unless CELERY_ARGS set --pool: threads in one
#: process. The calls in flight are the process's own (TPNS_MAX_IN_FLIGHT, worker/flush.py), not
#: one per pool slot, so more processes would only add memory (README, "Calls in flight")
DEFAULT_POOL = "threads"
#: task threads of the default pool unless CELERY_ARGS set --concurrency (bench uses it too):
#: flushes of different (app, operator_type) pairs and the sweep run side by side, all sharing
#: the process's call slots
DEFAULT_CONCURRENCY = 8
_APP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class AppConfig:
    """One TPNS app (an AccessID and its secret); an Android and an iOS app are two of these."""

    name: str
    access_id: str | None
    secret_key: str | None = field(default=None, repr=False)
    region: str = "guangzhou"
    base_url: str = REGION_URLS["guangzhou"]
    #: ``sign`` (HMAC-SHA256 headers) or ``basic``
    auth: str = "sign"

    @property
    def has_credentials(self) -> bool:
        return bool(self.access_id and self.secret_key)

    def __repr__(self) -> str:
        secret = "***" if self.secret_key else None
        return (f"AppConfig(name={self.name!r}, access_id={self.access_id!r}, secret_key={secret!r}, "
                f"region={self.region!r}, base_url={self.base_url!r}, auth={self.auth!r})")


@dataclass(frozen=True)
class Settings:
    """Everything configurable, validated. Units are in the names."""

    apps: Mapping[str, AppConfig]
    default_app: str = "default"
    redis_url: str | None = None
    data_dir: Path = Path(".")
    broker_url: str | None = None
    prefix: str = DEFAULT_PREFIX
    max_items_per_call: int = 20
    linger_ms: int = 250
    http_timeout_s: float = 10.0
    lease_s: float = 60.0
    max_calls_per_s: float = 0.0
    #: calls one worker process keeps in flight at most (its HTTP pool is sized to it)
    max_in_flight: int = 128
    max_attempts: int = 8
    max_age_s: float = 86400.0
    pause_s: float = 60.0
    status_ttl_s: int = 604800
    #: how long a succeeded intent keeps its whole record (payload included) before only its
    #: summary is left for the rest of the TTL (0: a summary at once; >= the TTL: never compacted)
    status_detail_s: int = 3600
    #: back-pressure: new intents are refused (``queue_full``) once queued + retrying + sending
    #: reach this many (0 = no limit)
    max_pending: int = 10_000_000
    #: replicas that must acknowledge an enqueue (Redis ``WAIT``) before it is acknowledged
    enqueue_min_replicas: int = 0
    #: how long an enqueue waits for them; past it the intents are reported in doubt
    enqueue_wait_ms: int = 1000
    #: whether an explicit ``TPNS_BASE_URL`` was given (lets a worker run without credentials)
    base_url_explicit: bool = False
    #: bearer token for ``tpns-batcher serve`` (None: no auth)
    api_token: str | None = field(default=None, repr=False)
    #: ``text`` or ``json``
    log_format: str = "text"
    #: a worker is stuck after this long without progress while Redis answers and work waits
    worker_stuck_s: float = 120.0
    #: verify accepted items through the query API before calling them succeeded (SPEC §6.1)
    verify: bool = False
    #: the first check of an accepted item, this long after the call
    verify_delay_ms: int = 1000
    #: an item not seen applied this long after its call is sent again (one attempt spent)
    verify_timeout_s: float = 30.0
    #: cap of the events stream (entries; trimmed approximately past 10,000)
    events_maxlen: int = 1_000_000
    #: where the workers POST the events (SPEC §8; None: no webhook); may carry credentials, so
    #: it is shown through ``shown_webhook_url`` only
    webhook_url: str | None = field(default=None, repr=False)
    #: the HMAC-SHA256 key of ``X-Tpns-Signature`` (required with ``webhook_url``)
    webhook_secret: str | None = field(default=None, repr=False)

    @property
    def app(self) -> AppConfig:
        """The default app."""
        return self.apps[self.default_app]

    def require_credentials(self) -> None:
        """Refuse to run a worker that would send without credentials to a real TPNS (SPEC §9)."""
        for app in self.apps.values():
            if not app.has_credentials and not self.base_url_explicit:
                var = "TPNS_ACCESS_ID" if app.name == "default" else f"TPNS_APP_{app.name.upper()}_ACCESS_ID"
                raise ConfigError(var, "credentials are required (set it and the secret key, "
                                       "or point TPNS_BASE_URL at a sandbox)")

    def __repr__(self) -> str:
        token = "***" if self.api_token else None
        return (f"Settings(apps={list(self.apps.values())!r}, default_app={self.default_app!r}, "
                f"redis_url={redact_url(self.redis_url)!r}, prefix={self.prefix!r}, "
                f"max_items_per_call={self.max_items_per_call}, linger_ms={self.linger_ms}, "
                f"lease_s={self.lease_s}, api_token={token!r})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 config_file: str | Path | None = None) -> Settings:
        """Build the settings from ``environ`` (default ``os.environ``) over the env file."""
        env = dict(os.environ if environ is None else environ)
        path = Path(config_file or env.get("TPNS_CONFIG_FILE") or DEFAULT_CONFIG_FILE)
        merged = {**read_env_file(path, required=bool(config_file or env.get("TPNS_CONFIG_FILE"))),
                  **env}
        return _build(merged)


def read_env_file(path: Path, *, required: bool = False) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (``#`` comments, optional ``export`` and quotes)."""
    if not path.is_file():
        if required:
            raise ConfigError("TPNS_CONFIG_FILE", f"no such file: {path}")
        return {}
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(str(path), f"line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _build(env: Mapping[str, str]) -> Settings:
    base_url = _opt(env, "TPNS_BASE_URL")
    if base_url is not None:
        _check_url("TPNS_BASE_URL", base_url)
    apps = _apps(env, base_url)
    default_app = _opt(env, "TPNS_DEFAULT_APP") or ("default" if "default" in apps else next(iter(apps)))
    if default_app not in apps:
        raise ConfigError("TPNS_DEFAULT_APP", f"{default_app!r} is not one of TPNS_APPS ({', '.join(apps)})")
    prefix = env.get("TPNS_REDIS_PREFIX", DEFAULT_PREFIX)
    if not prefix or any(c.isspace() for c in prefix):
        raise ConfigError("TPNS_REDIS_PREFIX", "must be non-empty without whitespace")
    redis_url = _opt(env, "REDIS_URL")
    if redis_url is not None and not redis_url.startswith(
            ("redis://", "rediss://", "unix://", "redis+socket://", "sentinel://", "redis+sentinel://",
             "redis+cluster://", "rediss+cluster://")):
        raise ConfigError("REDIS_URL", "must start with redis://, rediss://, unix://, sentinel:// "
                                       "or redis+cluster://")
    _cluster_rules(env, redis_url)
    http_timeout_s = _float(env, "TPNS_HTTP_TIMEOUT_S", 10.0, 0.001)
    lease_s = _float(env, "TPNS_LEASE_S", 60.0, 0.1)
    if lease_s < 4 * http_timeout_s:
        # an attempt may take a connect plus a read timeout; a call must end within its lease,
        # or its items are sent again while it runs and per-key order can no longer be kept
        raise ConfigError("TPNS_LEASE_S", f"must be at least 4 x TPNS_HTTP_TIMEOUT_S "
                                          f"({4 * http_timeout_s:g}), got {lease_s:g}")
    verify, verify_delay_ms, verify_timeout_s = _verify(env)
    webhook_url, webhook_secret = _webhook(env)
    log_format = env.get("TPNS_LOG_FORMAT", "text").strip().lower() or "text"
    if log_format not in ("text", "json"):
        raise ConfigError("TPNS_LOG_FORMAT", "must be text or json")
    return Settings(
        apps=apps,
        default_app=default_app,
        redis_url=redis_url,
        data_dir=Path(_opt(env, "TPNS_DATA_DIR") or _default_data_dir()),
        broker_url=_opt(env, "CELERY_BROKER_URL"),
        prefix=prefix,
        max_items_per_call=_int(env, "TPNS_MAX_ITEMS_PER_CALL", 20, 1, 20),
        linger_ms=_int(env, "TPNS_LINGER_MS", 250, 0, 3_600_000),
        http_timeout_s=http_timeout_s,
        lease_s=lease_s,
        max_calls_per_s=_float(env, "TPNS_MAX_CALLS_PER_S", 0.0, 0.0),
        max_in_flight=_int(env, "TPNS_MAX_IN_FLIGHT", 128, 1, 1024),
        max_attempts=_int(env, "TPNS_MAX_ATTEMPTS", 8, 1, 1000),
        max_age_s=_float(env, "TPNS_MAX_AGE_S", 86400.0, 1.0),
        pause_s=_float(env, "TPNS_PAUSE_S", 60.0, 0.0),
        status_ttl_s=_int(env, "TPNS_STATUS_TTL_S", 604800, 1, 10 * 365 * 86400),
        status_detail_s=_int(env, "TPNS_STATUS_DETAIL_S", 3600, 0, 10 * 365 * 86400),
        max_pending=_int(env, "TPNS_MAX_PENDING", 10_000_000, 0, 10**12),
        enqueue_min_replicas=_int(env, "TPNS_ENQUEUE_MIN_REPLICAS", 0, 0, 100),
        # WAIT 0 would block for ever: the wait is bounded
        enqueue_wait_ms=_int(env, "TPNS_ENQUEUE_WAIT_MS", 1000, 1, 600_000),
        base_url_explicit=base_url is not None,
        api_token=_opt(env, "TPNS_API_TOKEN"),
        log_format=log_format,
        worker_stuck_s=_float(env, "TPNS_WORKER_STUCK_S", 120.0, 5.0),
        verify=verify, verify_delay_ms=verify_delay_ms, verify_timeout_s=verify_timeout_s,
        events_maxlen=_int(env, "TPNS_EVENTS_MAXLEN", 1_000_000, 1, 10**10),
        webhook_url=webhook_url, webhook_secret=webhook_secret,
    )


def _verify(env: Mapping[str, str]) -> tuple[bool, int, float]:
    """TPNS_VERIFY (on|off), TPNS_VERIFY_DELAY_MS, TPNS_VERIFY_TIMEOUT_S (SPEC §6.1)."""
    raw = (_opt(env, "TPNS_VERIFY") or "off").lower()
    if raw not in ("on", "off"):
        raise ConfigError("TPNS_VERIFY", f"must be on or off, got {raw!r}")
    delay_ms = _int(env, "TPNS_VERIFY_DELAY_MS", 1000, 0, 3_600_000)
    timeout_s = _float(env, "TPNS_VERIFY_TIMEOUT_S", 30.0, 0.01)
    if timeout_s * 1000 < delay_ms:
        # the first check would come after the item is already given up on
        raise ConfigError("TPNS_VERIFY_TIMEOUT_S", f"must be at least TPNS_VERIFY_DELAY_MS "
                                                   f"({delay_ms / 1000:g} s), got {timeout_s:g}")
    return raw == "on", delay_ms, timeout_s


def _cluster_rules(env: Mapping[str, str], redis_url: str | None) -> None:
    """What a Redis Cluster store needs: a broker of its own (never the cluster). (A webhook is
    fine: a worker runs one deliverer per app there, ``worker.webhooks.start_deliverers``.)"""
    check_broker(redis_url, _opt(env, "CELERY_BROKER_URL"))


def _webhook(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """TPNS_WEBHOOK_URL and its secret (TPNS_WEBHOOK_SECRET, or _FILE); never echoes the secret."""
    url = _opt(env, "TPNS_WEBHOOK_URL")
    secret = _secret(env, "TPNS_WEBHOOK_SECRET")
    if url is None:
        return None, None
    if not re.match(r"^https?://[^\s/?#]+(/[^\s]*)?$", url):
        # the URL may hold credentials: name the rule, not the value
        raise ConfigError("TPNS_WEBHOOK_URL", f"must be an http:// or https:// URL with a host, "
                                              f"got {shown_webhook_url(url)!r}")
    if secret is None:
        raise ConfigError("TPNS_WEBHOOK_SECRET", "is required with TPNS_WEBHOOK_URL (the key of "
                                                 "X-Tpns-Signature; or TPNS_WEBHOOK_SECRET_FILE)")
    return url, secret


def _secret(env: Mapping[str, str], var: str) -> str | None:
    """``var``, or the contents of the file named by ``var_FILE`` (which wins, as for the keys)."""
    value = _opt(env, var)
    path = _opt(env, f"{var}_FILE")
    if path is None:
        return value
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{var}_FILE", f"cannot read the file ({exc.strerror})") from None
    if not value:
        raise ConfigError(f"{var}_FILE", "the file is empty")
    return value


def _apps(env: Mapping[str, str], base_url: str | None) -> dict[str, AppConfig]:
    names_raw = _opt(env, "TPNS_APPS")
    names = [n.strip() for n in names_raw.split(",") if n.strip()] if names_raw else ["default"]
    apps: dict[str, AppConfig] = {}
    for name in names:
        if not _APP_NAME.match(name):
            raise ConfigError("TPNS_APPS", f"app name {name!r} must be lowercase letters, digits, _ or -")
        if name in apps:
            raise ConfigError("TPNS_APPS", f"app {name!r} is listed twice")
        var = "TPNS_" if name == "default" else f"TPNS_APP_{name.upper().replace('-', '_')}_"
        apps[name] = _app(env, name, var, base_url)
    return apps


def _app(env: Mapping[str, str], name: str, var: str, base_url: str | None) -> AppConfig:
    access_id = _opt(env, f"{var}ACCESS_ID")
    secret = _secret(env, f"{var}SECRET_KEY")
    if (access_id is None) != (secret is None):
        missing = f"{var}SECRET_KEY" if secret is None else f"{var}ACCESS_ID"
        raise ConfigError(missing, "must be set together with the other half of the credentials")
    region = (_opt(env, f"{var}REGION") or _opt(env, "TPNS_REGION") or "guangzhou").lower()
    if region not in REGION_URLS:
        raise ConfigError(f"{var}REGION", f"unknown region {region!r} (one of {', '.join(REGION_URLS)})")
    app_url = _opt(env, f"{var}BASE_URL") if name != "default" else None
    if app_url is not None:
        _check_url(f"{var}BASE_URL", app_url)
    auth = (_opt(env, f"{var}AUTH") or _opt(env, "TPNS_AUTH") or "sign").lower()
    if auth not in ("sign", "basic"):
        raise ConfigError(f"{var}AUTH", "must be sign or basic")
    if access_id is None and (app_url or base_url):
        access_id, secret = SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY
    return AppConfig(name=name, access_id=access_id, secret_key=secret, region=region,
                     base_url=(app_url or base_url or REGION_URLS[region]).rstrip("/"), auth=auth)


def _default_data_dir() -> str:
    from platformdirs import user_data_dir

    return user_data_dir("tpns-batcher", appauthor=False)


def _opt(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None and value.strip() else None


def _check_url(name: str, url: str) -> None:
    if not re.match(r"^https?://[^\s/]+", url):
        raise ConfigError(name, f"must be an http:// or https:// URL, got {url!r}")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = _opt(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be from {low} to {high}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float) -> float:
    raw = _opt(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None
    if not value >= low or value != value or value == float("inf"):
        raise ConfigError(name, f"must be a finite number >= {low:g}, got {raw}")
    return value


def redact_url(url: str | None) -> str | None:
    """``url`` with its password (and any ``*password*`` query parameter) replaced by ``***``."""
    if url is None:
        return None
    url = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)
    return re.sub(r"([?&][^=&]*password[^=&]*=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


def shown_webhook_url(url: str) -> str:
    """A webhook URL fit for logs and status: no user info, no query or fragment (either may
    carry a token the receiver checks)."""
    url = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", url.strip())
    return re.split(r"[?#]", url, maxsplit=1)[0][:200]
