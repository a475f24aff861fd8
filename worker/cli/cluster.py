"""``move-app``: move one app's slot to another master of a Redis Cluster (issue 16)."""

from __future__ import annotations

import dataclasses
import json

import click
import redis

from ..errors import ConfigError
from . import common


@click.command("move-app")
@click.argument("app")
@click.option("--to", "target", required=True, metavar="HOST:PORT",
              help="The master of the cluster that is to hold the app's keys.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=600.0,
              show_default=True, help="Seconds to wait for the app's batches in flight.")
def move_app(app: str, target: str, timeout_s: float) -> None:
    """Move APP's slot to another master: hold the app (enqueues refused before writing, sending
    paused), wait for its batches in flight, move its keys, resume it. Other apps never stop.
    Prints what moved and how long the app stalled, as JSON."""
    from ..clustermove import move_app as move

    producer = common.producer()
    try:
        if app not in producer.apps():
            raise click.ClickException(f"app {app!r} is not known (configured or registered)")
        report = move(producer.store, app, target, timeout_s=timeout_s)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except TimeoutError as exc:
        raise click.ClickException(f"{exc}; the app is resumed, nothing moved") from None
    except redis.RedisError as exc:
        raise click.ClickException(f"the move failed ({type(exc).__name__}: {exc}); the app is "
                                   f"resumed: check `redis-cli --cluster check`") from None
    finally:
        producer.close()
    click.echo(json.dumps(dataclasses.asdict(report)))
