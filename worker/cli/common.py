"""What every command of the CLI shares: settings, the producer, the exit status of an outage."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NoReturn

import click

from ..errors import ConfigError, StoreUnavailableError
from ..settings import Settings

if TYPE_CHECKING:
    from ..producer import Producer

#: exit status when Redis is unreachable or refuses new intents (``queue_full``), SPEC §8
EXIT_UNAVAILABLE = 3


def unavailable(exc: StoreUnavailableError) -> NoReturn:
    """One line on stderr (the URL without its password, the cause), then exit 3."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_UNAVAILABLE)


def settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None


def producer() -> Producer:
    from ..producer import Producer

    try:
        return Producer(settings=settings())
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
