"""``tpns-batcher sandbox``: the command's options, its start line, and what it never prints."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from worker.sandbox.auth import SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY
from worker.sandbox.command import sandbox_command
from worker.sandbox.server import SandboxServer


def test_cli_help_explains_what_it_is() -> None:
    result = CliRunner().invoke(sandbox_command, ["--help"])
    assert result.exit_code == 0
    assert "fake of the TPNS account API" in result.output
    assert "TPNS_BASE_URL=http://127.0.0.1:8810 tpns-batcher worker" in result.output
    for option in ("--port", "--latency-ms", "--fault-rate", "--faults", "--seed",
                   "--access-id", "--secret-key", "--invalid-token-prefix",
                   "--reject-token-prefix", "--slow-ms", "--apply-delay-ms"):
        assert option in result.output


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the command start and return at once instead of serving forever."""
    monkeypatch.setattr(SandboxServer, "serve_forever", lambda self: None)


@pytest.mark.usefixtures("no_serving")
def test_cli_prints_the_url_and_the_public_sandbox_pair() -> None:
    result = CliRunner().invoke(sandbox_command, ["--port", "0"],
                                env={"TPNS_ACCESS_ID": None, "TPNS_SECRET_KEY": None})
    assert result.exit_code == 0, result.output
    line, = result.output.splitlines()
    assert "http://127.0.0.1:" in line
    assert SANDBOX_ACCESS_ID in line and SANDBOX_SECRET_KEY in line


@pytest.mark.usefixtures("no_serving")
@pytest.mark.parametrize(("args", "env", "source"), [
    ([], {"TPNS_SECRET_KEY": "my-own-secret"}, "(from TPNS_SECRET_KEY)"),
    (["--secret-key", "my-own-secret"], {"TPNS_SECRET_KEY": None}, "(from --secret-key)"),
])
def test_cli_never_echoes_a_user_secret(args: list[str], env: dict[str, str | None],
                                        source: str) -> None:
    result = CliRunner().invoke(sandbox_command, ["--port", "0", "--access-id", "77", *args],
                                env=env)
    assert result.exit_code == 0, result.output
    assert "my-own-secret" not in result.output
    assert "77" in result.output and source in result.output


def test_cli_refuses_an_unknown_fault() -> None:
    result = CliRunner().invoke(sandbox_command, ["--faults", "http_500,nope"])
    assert result.exit_code == 2
    assert "nope" in result.output


def test_cli_takes_the_apply_delay_and_the_lost_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SandboxServer] = []
    monkeypatch.setattr(SandboxServer, "serve_forever", lambda self: seen.append(self))
    result = CliRunner().invoke(sandbox_command, ["--port", "0", "--apply-delay-ms", "250",
                                                  "--faults", "lost", "--fault-rate", "0.1"])
    assert result.exit_code == 0, result.output
    config = seen[0].config
    assert (config.apply_delay_ms, config.faults, config.fault_rate) == (250.0, ("lost",), 0.1)
