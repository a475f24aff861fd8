"""Commands that look up what happened: history (by token or account) and events (the stream)."""

from __future__ import annotations

import json
import sys
from typing import NoReturn

import click

from ..errors import IntentError, StoreUnavailableError
from . import common


def _refused(exc: IntentError) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.command()
@click.option("--token", help="The device token the intents named.")
@click.option("--account", help="The account the intents named (with --account-type).")
@click.option("--account-type", type=int, default=None, help="The account's type [default: 0].")
@click.option("--app", help="The app [default: TPNS_DEFAULT_APP].")
@click.option("--limit", type=int, default=None, help="At most this many, 1-500 [default: 50].")
def history(token: str | None, account: str | None, account_type: int | None, app: str | None,
            limit: int | None) -> None:
    """The latest intents that named a token or an account, newest first, with their statuses,
    as JSON lines (while their records live: TPNS_STATUS_TTL_S). Exit 1 when there are none."""
    producer = common.producer()
    try:
        found = producer.history(token, account=account, account_type=account_type, app=app,
                                 limit=limit)
    except IntentError as exc:
        _refused(exc)
    except StoreUnavailableError as exc:
        common.unavailable(exc)
    finally:
        producer.close()
    for st in found:
        click.echo(json.dumps(st.to_dict(), ensure_ascii=False))
    if not found:
        click.echo("no intents found for this key", err=True)
        sys.exit(1)


@click.command()
@click.option("--from", "from_id", default="0", show_default=True,
              help="Where to start: 0 (all kept), $ (only new ones), or a stream id to resume "
                   "after (its milliseconds alone will do); on a Redis Cluster store without "
                   "--app, also an event's cursor.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option("--state", type=click.Choice(["retrying", "verifying", "succeeded", "failed"]),
              help="Only events of this state (gaps are always printed).")
@click.option("--app", help="On a Redis Cluster store, the app whose stream to read (each app "
                            "has its own; without --app, every app's merged in time order, each "
                            "line with the cursor to resume from).")
def events(from_id: str, follow: bool, state: str | None, app: str | None) -> None:
    """The events stream as JSON lines, each with its stream_id: every change of an intent to
    retrying, verifying, succeeded or failed. Where entries were trimmed (TPNS_EVENTS_MAXLEN)
    before they were read, a line {"event": "gap", ...} names the first id kept."""
    producer = common.producer()
    try:
        for item in producer.events(from_id, follow=follow, state=state, app=app):
            click.echo(json.dumps(item.as_dict(), ensure_ascii=False))
            if follow:
                sys.stdout.flush()
    except IntentError as exc:
        _refused(exc)
    except StoreUnavailableError as exc:
        common.unavailable(exc)
    except KeyboardInterrupt:
        pass
    finally:
        producer.close()
