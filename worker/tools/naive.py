"""The naive design, kept only as the benchmark's baseline (SPEC §10): one Celery task per intent
and one HTTP call per intent.

It is what SPEC §2 decided against, built as a careful team would build it, so the comparison is
fair: the same Redis (broker and status store), the same ``TpnsClient`` (one ``requests.Session``
per process, signing, tenacity), the same pool and concurrency as the real worker, Celery's
default prefetch (4 per process, better for many short tasks than the real worker's 1), early acks,
no results. The task builds a one-item ``batchoperate`` call and writes the status with one plain
``SET`` (plus an ``INCR`` of a done counter in the same round trip, which the benchmark watches).
No per-key order, no leases, no retries between calls: the baseline is kept as cheap as it can be.

Run by the benchmark as ``python -m worker.tools.naive worker [CELERY ARGS]`` with ``REDIS_URL``,
``TPNS_REDIS_PREFIX`` and ``TPNS_BASE_URL`` set; not part of the product's CLI.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from celery import Celery

from ..celery_app import base_celery
from ..client import TpnsClient
from ..connections import redis_client
from ..errors import TpnsError
from ..model import Account, BatchItem, Intent
from ..settings import Settings

NAIVE_TASK = "tpns.naive.send"


def make_naive_celery(settings: Settings, redis_url: str, prefix: str) -> Celery:
    """The baseline's Celery app: its own queue and key prefix on the same Redis."""
    return base_celery("tpns_naive", redis_url, f"{prefix}naive", f"{prefix}naive:")


def task_args(intent_id: str, intent: Intent) -> list[Any]:
    """The message of one intent: ``[id, operator_type, token, [[account, type], ...]]``."""
    return [intent_id, intent.operator_type, intent.token,
            [[a.account, a.account_type] for a in intent.accounts]]


def done_key(prefix: str) -> str:
    """The counter the naive task increments once per intent that reached a final state."""
    return f"{prefix}naive:done"


def register(app: Celery, settings: Settings, redis_url: str, prefix: str) -> None:
    """Register the one naive task on ``app``."""
    local: dict[int, tuple[Any, TpnsClient]] = {}

    def parts() -> tuple[Any, TpnsClient]:
        pid = os.getpid()
        if pid not in local:
            local.clear()
            app_config = settings.apps[settings.default_app]
            local[pid] = (redis_client(redis_url),
                          TpnsClient(app_config, timeout_s=settings.http_timeout_s))
        return local[pid]

    @app.task(name=NAIVE_TASK, ignore_result=True)
    def send(intent_id: str, operator_type: int, token: str | None,
             accounts: Sequence[Sequence[Any]]) -> None:
        redis, client = parts()
        item = BatchItem(id=intent_id, token=token,
                         accounts=tuple(Account(a, int(t)) for a, t in accounts),
                         attempts=1, created_at_ms=0)
        try:
            result = client.batchoperate(operator_type, [item])
            code = result.result[0] if result.result else "0"
            state = "succeeded" if code in ("0", "ok") else "failed"
            status = {"state": state, "result_code": code, "ret_code": result.ret_code}
        except TpnsError as exc:
            status = {"state": "failed", "error": exc.code}
        pipe = redis.pipeline(transaction=False)
        pipe.set(f"{prefix}naive:i:{intent_id}", json.dumps(status), ex=settings.status_ttl_s)
        pipe.incr(done_key(prefix))
        pipe.execute()


def main(argv: Sequence[str]) -> None:
    """``python -m worker.tools.naive worker [CELERY ARGS]``."""
    settings = Settings.from_env()
    if not settings.redis_url:
        raise SystemExit("the naive worker needs REDIS_URL")
    app = make_naive_celery(settings, settings.redis_url, settings.prefix)
    register(app, settings, settings.redis_url, settings.prefix)
    args = list(argv[1:]) if argv and argv[0] == "worker" else list(argv)
    app.worker_main(argv=["worker", "--loglevel", "WARNING", "--without-gossip",
                          "--without-mingle", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
