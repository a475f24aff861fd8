"""The sweep, run every second from beat: reap expired leases, wake every (app, op) with work.

``Flusher.sweep`` runs it with the worker's store, settings and waker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import redis

from .settings import Settings
from .store import Store, Wake, refused_before_writing

logger = logging.getLogger(__name__)


def sweep(settings: Settings, store: Store, wake: Callable[[Sequence[Wake]], None]
          ) -> dict[str, int]:
    """Reap expired leases and wake every (app, op) with eligible or retrying work.

    A Redis lock makes extra beats (two workers with beat) skip.
    """
    if not store.claim_sweep():
        return {"skipped": 1}
    reclaimed, wakes = store.reap()
    if reclaimed:
        logger.warning("reclaimed %d items from expired leases (a worker died or hung)",
                       reclaimed)
    sent = list(wakes)
    apps = set(settings.apps) | store.known_apps()
    for (app, op), (ready, _retrying) in store.ready_counts(apps).items():
        if store.claim_wake(app, op):
            sent.append(Wake(app, op, "now" if ready else "linger"))
    if sent:
        wake(sent)
    # last, and best effort: heads of expired records go (the history index stays bounded),
    # but a Redis at maxmemory refusing that write must not cost the wakes above
    try:
        store.prune_history()
    except redis.ResponseError as exc:
        if not refused_before_writing(exc):
            raise
    return {"reclaimed": reclaimed, "wakes": len(sent)}
