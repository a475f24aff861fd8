"""``tpns-batcher sandbox``: the command-line options, mapped onto a :class:`SandboxServer`.

The CLI imports this module only when the ``sandbox`` command runs.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import click
from click.core import ParameterSource

from .auth import SANDBOX_ACCESS_ID, SANDBOX_SECRET_KEY
from .config import DEFAULT_FAULTS, FAULT_KINDS, SandboxConfigError
from .server import SandboxServer


def startup_line(url: str, access_id: str, secret_key: str, secret_source: str | None) -> str:
    """The line ``tpns-batcher sandbox`` prints: the URL and the credentials it accepts.

    The documented sandbox secret is printed (it is public); a secret the user supplied is not,
    only where it came from (``secret_source``, e.g. ``TPNS_SECRET_KEY``).
    """
    if secret_key == SANDBOX_SECRET_KEY or secret_source is None:
        secret = secret_key if secret_key == SANDBOX_SECRET_KEY else "(user-supplied)"
    else:
        secret = f"(from {secret_source})"
    return f"TPNS sandbox listening on {url}  access id: {access_id}  secret: {secret}"


def _faults_option(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    faults = tuple(f.strip() for f in value.split(",") if f.strip())
    unknown = sorted(set(faults) - FAULT_KINDS)
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(FAULT_KINDS))}")
    return faults


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. The admin endpoints have no auth: keep it local.")
@click.option("--port", default=8810, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0 picks a free one).")
@click.option("--latency-ms", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Delay added to every answer.")
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Probability that a batchoperate call gets an injected fault.")
@click.option("--faults", default=",".join(DEFAULT_FAULTS), show_default=True,
              callback=_faults_option,
              help="Comma-separated fault kinds to draw from; 'lost' (answered as accepted, "
                   "never applied) is drawn only when listed.")
@click.option("--seed", type=int, default=None, help="Seed for a reproducible fault sequence.")
@click.option("--access-id", envvar="TPNS_ACCESS_ID", default=SANDBOX_ACCESS_ID,
              show_default=True, help="AccessId to accept [env: TPNS_ACCESS_ID].")
@click.option("--secret-key", envvar="TPNS_SECRET_KEY", default=SANDBOX_SECRET_KEY,
              show_default=False,
              help="Secret key to accept [env: TPNS_SECRET_KEY; default: the documented sandbox "
                   "secret, printed at start].")
@click.option("--invalid-token-prefix", default="invalid-", show_default=True,
              help='Tokens with this prefix are answered as unknown ("1008006").')
@click.option("--reject-token-prefix", default="reject-", show_default=True,
              help="A token with this prefix makes the whole call 1008007 (invalid parameter).")
@click.option("--slow-ms", default=3000.0, show_default=True, type=click.FloatRange(min=0),
              help="How late the 'timeout' fault answers.")
@click.option("--apply-delay-ms", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Apply accepted batchoperate calls this much later, like the asynchronous "
                   "service: queries see the old state until then.")
@click.pass_context
def sandbox_command(ctx: click.Context, host: str, port: int, latency_ms: float,
                    fault_rate: float, faults: tuple[str, ...], seed: int | None,
                    access_id: str, secret_key: str, invalid_token_prefix: str,
                    reject_token_prefix: str, slow_ms: float, apply_delay_ms: float) -> None:
    """Run the TPNS sandbox: a local fake of the TPNS account API.

    It lets you try tpns-batcher without TPNS credentials. It serves the same paths as TPNS
    (/v3/device/account/batchoperate and /v3/device/account/query), checks both auth methods and
    the service's validation rules, keeps the bindings that later calls and queries see, and can
    inject faults (latency, HTTP 5xx/429, 1008004, 1008028, timeouts, dropped connections).

    Without --access-id/--secret-key (or TPNS_ACCESS_ID/TPNS_SECRET_KEY) it accepts a documented,
    public sandbox pair, which it prints at start. Point a worker at it:

    \b
        tpns-batcher sandbox --port 8810
        TPNS_BASE_URL=http://127.0.0.1:8810 tpns-batcher worker

    Tokens starting with "invalid-" are answered as unknown tokens, so partial failures can be
    seen. --apply-delay-ms and the 'lost' fault show why TPNS_VERIFY=on exists. Sandbox-only
    admin endpoints: GET /healthz, GET /sandbox/stats, POST /sandbox/reset,
    GET|POST /sandbox/config.
    """
    try:
        server = SandboxServer(host, port, access_id=access_id, secret_key=secret_key,
                               latency_ms=latency_ms, fault_rate=fault_rate, faults=faults,
                               seed=seed, invalid_token_prefix=invalid_token_prefix,
                               reject_token_prefix=reject_token_prefix, slow_ms=slow_ms,
                               apply_delay_ms=apply_delay_ms)
    except (OSError, SandboxConfigError) as exc:
        raise click.ClickException(f"cannot start the sandbox on {host}:{port}: {exc}") from None
    source = ctx.get_parameter_source("secret_key")
    secret_source = ("TPNS_SECRET_KEY" if source is ParameterSource.ENVIRONMENT
                     else "--secret-key" if source is ParameterSource.COMMANDLINE else None)
    click.echo(startup_line(server.url, access_id, secret_key, secret_source))
    previous = _on_sigterm_interrupt()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm_interrupt() -> Any:
    """Make SIGTERM stop the sandbox like Ctrl-C does; the previous handler (None off-main)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
