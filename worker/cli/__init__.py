"""The ``tpns-batcher`` command (SPEC §8). Errors go to stderr with a non-zero exit code.

The group imports no command module: each command is loaded when it is named, so
``tpns-batcher status`` never pays for Celery, Starlette, rich or the sandbox (see
``LazyGroup``). One module per family of commands:

* ``intents.py``  enqueue, status, wait, requeue-failed (through the ``Producer``)
* ``observe.py``  stats, health
* ``lookup.py``   history (by token or account), events (the stream)
* ``run.py``      worker (the Celery worker with its heartbeat and watchdog)
* ``cluster.py``  move-app (an app's slot to another master of a Redis Cluster)
* serve, sandbox, bench and demo live in their own rooms (``worker.serve``, ``worker.sandbox``,
  ``worker.tools``) and are loaded from there.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

#: command name -> "module:attribute" of its click command, imported on first use
COMMANDS: dict[str, str] = {
    "bench": "worker.tools.bench:bench_command",
    "demo": "worker.tools.demo:demo_command",
    "enqueue": "worker.cli.intents:enqueue",
    "events": "worker.cli.lookup:events",
    "health": "worker.cli.observe:health",
    "history": "worker.cli.lookup:history",
    "move-app": "worker.cli.cluster:move_app",
    "requeue-failed": "worker.cli.intents:requeue_failed",
    "sandbox": "worker.sandbox.command:sandbox_command",
    "serve": "worker.serve.app:serve_command",
    "stats": "worker.cli.observe:stats",
    "status": "worker.cli.intents:status",
    "wait": "worker.cli.intents:wait",
    "worker": "worker.cli.run:worker",
}


class LazyGroup(click.Group):
    """A group whose commands are imported by name when resolved (click's documented pattern).

    ``tpns-batcher --help`` still lists every command with its short help: it imports them all,
    which only costs that one listing.
    """

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module_name, attr = self.lazy[cmd_name].split(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):  # a wrong entry in COMMANDS, not user input
            raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
        return command


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tpns-batcher")
def main() -> None:
    """Batch TPNS account bind/unbind intents into the fewest correct calls.

    Producers enqueue one intent at a time (``enqueue``, the Python ``Producer``, or ``serve``);
    workers (``worker``) group them into calls of at most 20 tokens per operator_type, keep
    per-key order, retry transient failures and record a status for every intent in Redis.

    Without REDIS_URL every command uses one embedded Redis under TPNS_DATA_DIR.
    Try it with no credentials: ``tpns-batcher demo``.
    """
