"""Settings (SPEC §7): defaults, the env file, apps, secrets kept out of repr, one clear line per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.errors import ConfigError
from worker.settings import REGION_URLS, SANDBOX_ACCESS_ID, Settings, redact_url

SECRET = "s3cr3t-do-not-print-0f9e8d7c"


def test_defaults_follow_the_spec(tmp_path: Path) -> None:
    s = Settings.from_env({"TPNS_DATA_DIR": str(tmp_path)}, config_file=None)
    assert (s.max_items_per_call, s.linger_ms, s.http_timeout_s, s.lease_s) == (20, 250, 10.0, 60.0)
    assert (s.max_calls_per_s, s.max_attempts, s.max_age_s, s.pause_s) == (0.0, 8, 86400.0, 60.0)
    assert (s.status_ttl_s, s.prefix, s.redis_url, s.broker_url) == (604800, "tpns:", None, None)
    assert s.app.base_url == REGION_URLS["guangzhou"] and s.app.auth == "sign"
    assert not s.app.has_credentials
    assert (s.max_pending, s.enqueue_min_replicas, s.enqueue_wait_ms) == (10_000_000, 0, 1000)
    assert (s.verify, s.verify_delay_ms, s.verify_timeout_s) == (False, 1000, 30.0)
    assert s.max_in_flight == 128


def test_verification_is_turned_on_with_its_delay_and_timeout() -> None:
    s = Settings.from_env({"TPNS_VERIFY": "ON", "TPNS_VERIFY_DELAY_MS": "20",
                           "TPNS_VERIFY_TIMEOUT_S": "0.5"})
    assert (s.verify, s.verify_delay_ms, s.verify_timeout_s) == (True, 20, 0.5)


def test_the_environment_overrides_the_env_file(tmp_path: Path) -> None:
    path = tmp_path / "tpns.env"
    path.write_text("# defaults\nTPNS_LINGER_MS=100\nexport TPNS_REGION='singapore'\nTPNS_LEASE_S=45\n")
    s = Settings.from_env({"TPNS_CONFIG_FILE": str(path), "TPNS_LINGER_MS": "50"})
    assert s.linger_ms == 50 and s.lease_s == 45.0
    assert s.app.base_url == REGION_URLS["singapore"]


@pytest.mark.parametrize(("env", "variable", "words"), [
    ({"TPNS_REGION": "mars"}, "TPNS_REGION", "unknown region"),
    ({"TPNS_MAX_PENDING": "-1"}, "TPNS_MAX_PENDING", "from 0"),
    ({"TPNS_ENQUEUE_MIN_REPLICAS": "x"}, "TPNS_ENQUEUE_MIN_REPLICAS", "whole number"),
    ({"TPNS_ENQUEUE_WAIT_MS": "0"}, "TPNS_ENQUEUE_WAIT_MS", "from 1"),
    ({"TPNS_MAX_ITEMS_PER_CALL": "0"}, "TPNS_MAX_ITEMS_PER_CALL", "from 1 to 20"),
    ({"TPNS_MAX_ITEMS_PER_CALL": "21"}, "TPNS_MAX_ITEMS_PER_CALL", "from 1 to 20"),
    ({"TPNS_MAX_ITEMS_PER_CALL": "ten"}, "TPNS_MAX_ITEMS_PER_CALL", "whole number"),
    ({"TPNS_LINGER_MS": "-1"}, "TPNS_LINGER_MS", "from 0"),
    ({"TPNS_MAX_IN_FLIGHT": "0"}, "TPNS_MAX_IN_FLIGHT", "from 1 to 1024"),
    ({"TPNS_MAX_IN_FLIGHT": "many"}, "TPNS_MAX_IN_FLIGHT", "whole number"),
    ({"TPNS_LEASE_S": "-5"}, "TPNS_LEASE_S", ">= 0.1"),
    ({"TPNS_HTTP_TIMEOUT_S": "nan"}, "TPNS_HTTP_TIMEOUT_S", "finite"),
    ({"TPNS_PAUSE_S": "inf"}, "TPNS_PAUSE_S", "finite"),
    ({"TPNS_AUTH": "oauth"}, "TPNS_AUTH", "sign or basic"),
    ({"REDIS_URL": "http://x"}, "REDIS_URL", "must start with"),
    ({"TPNS_BASE_URL": "ftp://x"}, "TPNS_BASE_URL", "http"),
    ({"TPNS_ACCESS_ID": "1500000009"}, "TPNS_SECRET_KEY", "together"),
    ({"TPNS_APPS": "Android"}, "TPNS_APPS", "lowercase"),
    ({"TPNS_APPS": "ios,ios"}, "TPNS_APPS", "twice"),
    ({"TPNS_APPS": "android,ios", "TPNS_DEFAULT_APP": "web"}, "TPNS_DEFAULT_APP", "not one of"),
    ({"TPNS_SECRET_KEY_FILE": "/nonexistent/key", "TPNS_ACCESS_ID": "1"}, "TPNS_SECRET_KEY_FILE", "cannot read"),
    ({"TPNS_LOG_FORMAT": "xml"}, "TPNS_LOG_FORMAT", "text or json"),
    ({"TPNS_VERIFY": "yes"}, "TPNS_VERIFY", "on or off"),
    ({"TPNS_VERIFY_DELAY_MS": "-1"}, "TPNS_VERIFY_DELAY_MS", "from 0"),
    ({"TPNS_VERIFY_TIMEOUT_S": "0"}, "TPNS_VERIFY_TIMEOUT_S", ">= 0.01"),
    ({"TPNS_VERIFY_DELAY_MS": "5000", "TPNS_VERIFY_TIMEOUT_S": "2"}, "TPNS_VERIFY_TIMEOUT_S",
     "at least TPNS_VERIFY_DELAY_MS"),
])
def test_a_bad_value_is_one_line_naming_the_variable(env: dict[str, str], variable: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert message.startswith(f"{variable}: ") and words in message and "\n" not in message


def test_the_secret_comes_from_a_file_and_never_shows(tmp_path: Path) -> None:
    key = tmp_path / "secret"
    key.write_text(SECRET + "\n")
    s = Settings.from_env({"TPNS_ACCESS_ID": "1500000009", "TPNS_SECRET_KEY_FILE": str(key),
                           "TPNS_API_TOKEN": "tok-" + SECRET, "REDIS_URL": f"redis://:{SECRET}@h:6379/0"})
    assert s.app.secret_key == SECRET
    for text in (repr(s), str(s), repr(s.app), str(s.apps)):
        assert SECRET not in text
    assert "***" in repr(s.app)


def test_several_apps_each_with_their_own_credentials() -> None:
    s = Settings.from_env({"TPNS_APPS": "android,ios", "TPNS_DEFAULT_APP": "ios",
                           "TPNS_APP_ANDROID_ACCESS_ID": "1", "TPNS_APP_ANDROID_SECRET_KEY": "a",
                           "TPNS_APP_IOS_ACCESS_ID": "2", "TPNS_APP_IOS_SECRET_KEY": "b",
                           "TPNS_APP_IOS_REGION": "hongkong", "TPNS_APP_IOS_AUTH": "basic"})
    assert list(s.apps) == ["android", "ios"] and s.default_app == "ios"
    assert s.apps["ios"].base_url == REGION_URLS["hongkong"] and s.apps["ios"].auth == "basic"
    assert s.apps["android"].access_id == "1"


def test_a_worker_refuses_to_start_without_credentials_unless_a_base_url_is_explicit() -> None:
    with pytest.raises(ConfigError, match="TPNS_ACCESS_ID: credentials are required"):
        Settings.from_env({}).require_credentials()
    sandboxed = Settings.from_env({"TPNS_BASE_URL": "http://127.0.0.1:8810/"})
    sandboxed.require_credentials()
    assert sandboxed.app.base_url == "http://127.0.0.1:8810"
    assert sandboxed.app.access_id == SANDBOX_ACCESS_ID


def test_the_worker_command_stops_with_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TPNS_ACCESS_ID", "TPNS_SECRET_KEY", "TPNS_BASE_URL", "TPNS_APPS", "TPNS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(main, ["worker"])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines()[-1].startswith("Error: configuration: TPNS_ACCESS_ID:")
    monkeypatch.setenv("TPNS_MAX_ITEMS_PER_CALL", "21")
    result = CliRunner().invoke(main, ["stats"])
    assert result.exit_code != 0
    assert "TPNS_MAX_ITEMS_PER_CALL: must be from 1 to 20, got 21" in result.stderr


def test_health_names_a_bad_setting_rather_than_blaming_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPNS_LINGER_MS", "-4")
    result = CliRunner().invoke(main, ["health"])
    assert result.exit_code == 1
    assert result.stdout.strip() == "unhealthy: configuration: TPNS_LINGER_MS: must be from 0 to 3600000, got -4"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:pw@h/0", "redis://user:***@h/0"),
    ("sentinel://:pw@s1:26379,s2/m/0?sentinel_password=spw&ssl=true",
     "sentinel://:***@s1:26379,s2/m/0?sentinel_password=***&ssl=true"),
    ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
])
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_webhook_needs_a_url_with_a_host_and_a_secret_never_shown(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"TPNS_BASE_URL": "http://127.0.0.1:8810"}
    assert Settings.from_env(base).webhook_url is None
    secret_file = tmp_path / "whsec"
    secret_file.write_text("s3cr3t-from-file\n", encoding="utf-8")
    s = Settings.from_env({**base, "TPNS_WEBHOOK_URL": "https://hooks.example/tpns",
                           "TPNS_WEBHOOK_SECRET_FILE": str(secret_file)})
    assert (s.webhook_url, s.webhook_secret) == ("https://hooks.example/tpns", "s3cr3t-from-file")
    assert "s3cr3t" not in repr(s)
    with pytest.raises(ConfigError, match=r"^TPNS_WEBHOOK_SECRET: is required with TPNS_WEBHOOK_URL"):
        Settings.from_env({**base, "TPNS_WEBHOOK_URL": "https://hooks.example/tpns"})
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({**base, "TPNS_WEBHOOK_URL": "ftp://u:pw@hooks.example/x?token=t0k",
                           "TPNS_WEBHOOK_SECRET": "s"})
    assert str(bad.value) == ("TPNS_WEBHOOK_URL: must be an http:// or https:// URL with a host, "
                              "got 'ftp://hooks.example/x'")
    # the worker stops at start-up with that one line
    for name, value in {**base, "TPNS_WEBHOOK_URL": "hooks.example"}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["worker"])
    assert result.exit_code != 0
    assert result.stderr.strip().splitlines()[-1].startswith("Error: configuration: TPNS_WEBHOOK_URL:")
