"""Commands on intents through the ``Producer``: enqueue, status, wait, requeue-failed."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import IO, Any

import click

from ..errors import IntentError, StoreUnavailableError, TpnsBatcherError
from ..jsonin import decode_line, iter_lines
from . import common

#: lines read and enqueued per round of ``enqueue``
ENQUEUE_BATCH = 5000


def _read_batches(stream: IO[bytes]) -> Iterator[tuple[list[int], list[Any], list[IntentError]]]:
    """Lines read as bytes, one at a time (any size, stdin too), each decoded on its own."""
    numbers: list[int] = []
    objs: list[Any] = []
    bad: list[IntentError] = []
    for number, line in iter_lines(stream):
        try:
            objs.append(decode_line(line, number))
            numbers.append(number)
        except IntentError as exc:
            bad.append(exc)
        if len(objs) + len(bad) >= ENQUEUE_BATCH:
            yield numbers, objs, bad
            numbers, objs, bad = [], [], []
    if objs or bad:
        yield numbers, objs, bad


@click.command()
@click.argument("source", type=click.File("rb"))
def enqueue(source: IO[bytes]) -> None:
    """Enqueue JSON Lines from SOURCE (a file, or - for stdin).

    Prints one id per accepted line, in input order, to stdout; each refused line goes to stderr
    as ``line N: reason``. Exits 1 if any line was refused. If Redis becomes unreachable (or
    refuses new intents: queue_full), the stored ids are printed as usual, the lines in doubt
    and those not stored are named on stderr, and the exit status is 3. A UTF-8 BOM and CRLF
    line ends are accepted; a line that is not valid UTF-8 or JSON is refused on its own.
    """
    producer = common.producer()
    refused = 0
    progress = _progress() if sys.stderr.isatty() else None
    last_line = 0
    try:
        for numbers, objs, bad in _read_batches(source):
            try:
                result = producer.enqueue(objs, line_numbers=numbers)
            except StoreUnavailableError as exc:
                _report_unavailable(exc, numbers, bad, last_line)
                common.unavailable(exc)
            refusals = sorted([*bad, *result.errors.values()], key=lambda e: e.line or 0)
            for err in refusals:
                click.echo(f"line {err.line}: {err.reason}", err=True)
            if result.accepted:
                click.echo("\n".join(result.accepted))
            refused += len(refusals)
            last_line = max([last_line, *numbers, *(e.line or 0 for e in bad)])
            if progress is not None:
                progress.advance(len(objs) + len(bad))
    except TpnsBatcherError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if progress is not None:
            progress.stop()
        producer.close()
    if refused:
        sys.exit(1)


def _report_unavailable(exc: StoreUnavailableError, numbers: list[int], bad: list[IntentError],
                        last_line: int) -> None:
    """The round Redis failed in: stored ids on stdout; refusals, lines in doubt and lines not
    stored on stderr; and where the lines never read begin."""
    from ..producer import BulkResult

    result = exc.result if isinstance(exc.result, BulkResult) else BulkResult()
    notes: list[tuple[int, str]] = [(e.line or 0, e.reason) for e in bad]
    notes += [(e.line or 0, e.reason) for e in result.errors.values()]
    notes += [(numbers[k], f"in doubt (id {i}): sent, not acknowledged; look it up with "
                           f"`tpns-batcher status {i}`") for k, i in result.in_doubt.items()]
    notes += [(numbers[k], f"not stored ({exc.code}): safe to send again")
              for k in result.not_stored]
    for line, note in sorted(notes):
        click.echo(f"line {line}: {note}", err=True)
    if result.accepted:
        click.echo("\n".join(result.accepted))
    last = max([last_line, *numbers, *(e.line or 0 for e in bad)])
    click.echo(f"lines after {last}: not read, not sent", err=True)


class _progress:
    """A live count on the terminal (stderr) while a bulk enqueue runs."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._bar = Progress(SpinnerColumn(), TextColumn("enqueued {task.completed} lines"),
                             TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._task = self._bar.add_task("enqueue", total=None)
        self._bar.start()

    def advance(self, n: int) -> None:
        self._bar.advance(self._task, n)

    def stop(self) -> None:
        self._bar.stop()


@click.command()
@click.argument("ids", nargs=-1, required=True)
def status(ids: tuple[str, ...]) -> None:
    """Print the status of each intent as one JSON object per line; exit 1 if any id is unknown."""
    producer = common.producer()
    missing = 0
    try:
        found = producer.statuses(list(ids))
    except StoreUnavailableError as exc:
        common.unavailable(exc)
    finally:
        producer.close()
    for intent_id, st in zip(ids, found, strict=True):
        if st is None:
            missing += 1
            click.echo(f"{intent_id}: not found", err=True)
        else:
            click.echo(json.dumps(st.to_dict(), ensure_ascii=False))
    if missing:
        sys.exit(1)


@click.command()
@click.argument("ids", nargs=-1, required=True)
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds to wait.")
def wait(ids: tuple[str, ...], timeout_s: float) -> None:
    """Wait until every intent is terminal, then print their statuses.

    Exit 0 if all succeeded, 1 if any failed (or is unknown), 2 on timeout.
    """
    producer = common.producer()
    try:
        statuses = producer.wait(list(ids), timeout_s=timeout_s)
    except TimeoutError as exc:
        click.echo(f"timeout: {exc}", err=True)
        sys.exit(2)
    except StoreUnavailableError as exc:
        common.unavailable(exc)
    finally:
        producer.close()
    code = 0
    for intent_id, st in zip(ids, statuses, strict=True):
        if st is None:
            click.echo(f"{intent_id}: not found", err=True)
            code = 1
        else:
            click.echo(json.dumps(st.to_dict(), ensure_ascii=False))
            if st.state != "succeeded":
                code = 1
    sys.exit(code)


@click.command("requeue-failed")
@click.option("--error", "error", default=None, metavar="CODE",
              help="Only intents that failed with this error (e.g. exhausted, invalid_token).")
def requeue_failed(error: str | None) -> None:
    """Put failed intents back into the queue (prints their ids)."""
    producer = common.producer()
    try:
        ids = producer.requeue_failed(error)
    except StoreUnavailableError as exc:
        common.unavailable(exc)
    finally:
        producer.close()
    for intent_id in ids:
        click.echo(intent_id)
    click.echo(f"requeued {len(ids)} failed intents", err=True)
