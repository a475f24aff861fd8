"""Every name tpns-batcher gives a thing in Redis and in the broker, every TTL and flag: one place.

Key layout under the configurable prefix ``P`` (default ``tpns:``):

    P i:{id}             the intent's record (JSON string; a TTL once terminal)
    P ko:{shard}         hashes: digest of a key (app+token, app+account+type) -> latest pending holder
    P h:{shard}          hashes: the same digests -> the latest intent that named the key, any state
                         (history by key; each record links to its predecessors, ``hp``); the
                         field is the digest's last 7 hex digits packed in 4 bytes, the value
                         the id packed (``lib.lua``'s ``id_pack``: 20 hex digits in 10 bytes)
    P cm                 hash: the families of summaries (compact terminal records): "<start>"
                         -> its buckets, "<start>:n" -> its summaries, "<start>:x" -> when its
                         buckets expire (epoch s); <start> is the epoch second its span began
    P c:{start}:{k}      bucket k of a family: packed id -> the summary of a succeeded intent
                         past its detail period (cmsgpack; ``lua/summary.lua``); one linear
                         hash table per family, so each bucket stays a small listpack, and one
                         TTL per bucket (the family's)
    P c:{start}:o        hash: the family's summaries too long for a listpack entry (a stub in
                         their bucket), with the family's TTL
    P hcur               the next history shard the sweep prunes (heads of expired records)
    P events             the events stream (capped at ``TPNS_EVENTS_MAXLEN``)
    P webhook            hash: the webhook's cursor (last delivered stream id and its ordinal),
                         delivered / failures / gaps totals, last delivery and last error
    P webhook:lease      the webhook deliverer's lease (PX ``WEBHOOK_LEASE_MS``): one leader
    P q:{app}:{op}       list: ids eligible now, oldest first
    P d:{app}:{op}       zset: retrying ids by the time their backoff ends
    P v:{app}            zset: verifying ids by the time of their next check (SPEC §6.1)
    P batches, P leases  hash batch_id -> its ids; zset batch_id -> lease deadline
    P seq                the batch sequence number
    P n                  hash of counters: "<state>:<op>", "enqueued:<op>", calls, items_sent, ...
    P m                  hash of call metrics: calls by op and class, latency and batch-size buckets
    P failed             zset of failed ids (trimmed to the status TTL)
    P ts, P tm           hashes: the timeline's rings of per-second and per-minute counters
                         (``worker.timeline``; fixed in size)
    P pause:{app}        set while sending for an app is paused (PX = the pause)
    P move:{app}         set while the app's slot moves to another master (cluster mode only)
    P backoff:{app}      epoch ms until which nobody sends for the app (after a 429 / 1008028)
    P rate:{app}         the global rate limit's next free slot (GCRA)
    P wake:{app}:{op}    a full batch's wake is on its way (PX ``WAKE_FLAG_MS``)
    P wakel:{app}:{op}   a linger wake is on its way (PX the linger, or the wait left)
    P wakev:{app}        a verify wake is on its way (PX the verify delay)
    P apps, P workers    set of app names workers serve; zset worker -> last heartbeat (s)
    P sweep              the sweep's lock (PX ``SWEEP_LOCK_MS``): one sweep per beat
    P probe:{host}:{pid} a worker watchdog's write probe (PX ``PROBE_TTL_MS``)
    P flush              the Celery queue of wake-ups; the broker's own keys under ``P celery:``

In Redis Cluster mode (``REDIS_URL=redis+cluster://…``) every key of an app lives under the app's
own prefix ``P {app}:`` (``Keys.tagged``): the braces make the app the hash tag, so all of an app's
records, chains, queues, counters, batches, leases, events and history sit in one slot, and every
script, run with that prefix, touches that one slot. What is global above is then per app (``P
{app}:n``, ``P {app}:events``, ``P {app}:leases``, …); only ``apps``, ``workers``, ``sweep``,
``probe:`` and the broker's keys stay under ``P`` (plain one-key commands). Ids carry their app
(``android.6f1c…``, ``app_id``) and batch ids end in it (``b17.9ac3e0f1.android``), so a lookup
by id finds the slot. A standalone Redis keeps the layout above, byte for byte.

The Lua scripts do not spell these names: ``lua_prelude()`` renders them (and the TTLs, buckets
and states the scripts need) as Lua locals, which the store puts in front of every script.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .model import OPERATOR_TYPES, PENDING_STATES

DEFAULT_PREFIX = "tpns:"

#: the part after the prefix of each key (a trailing ``:`` is followed by the key's own parts)
RECORD = "i:"
KEY_INDEX = "ko:"
HISTORY = "h:"
HISTORY_CURSOR = "hcur"
SUMMARY = "c:"
SUMMARY_META = "cm"
EVENTS = "events"
#: beside each events stream (same hash slot: a suffix keeps the key's {app} tag), the count of
#: entries ever added, kept by emit(): XINFO STREAM reports it only from Redis 7 on, and without it
#: a reader cannot tell a stream that never lost an entry from a trimmed one
EVENTS_ADDED_SUFFIX = ":added"
WEBHOOK = "webhook"
WEBHOOK_LEASE = "webhook:lease"
READY = "q:"
DELAYED = "d:"
VERIFYING = "v:"
BATCHES = "batches"
LEASES = "leases"
SEQ = "seq"
COUNTERS = "n"
METRICS = "m"
FAILED = "failed"
TIMELINE_SECONDS = "ts"
TIMELINE_MINUTES = "tm"
PAUSE = "pause:"
MOVE = "move:"
BACKOFF = "backoff:"
RATE = "rate:"
WAKE = "wake:"
WAKE_LINGER = "wakel:"
WAKE_VERIFY = "wakev:"
APPS = "apps"
WORKERS = "workers"
SWEEP_LOCK = "sweep"
PROBE = "probe:"
FLUSH_QUEUE = "flush"
CELERY = "celery:"

#: life of a full batch's wake flag: at most one immediate wake per (app, op) in this window
#: while no flush clears it (a flush that starts clears it, so the next full batch wakes again)
WAKE_FLAG_MS = 2000
#: life of the sweep's lock: extra beats (two workers running beat) skip their sweep
SWEEP_LOCK_MS = 800
#: a worker counts as alive when its heartbeat is at most this old (health, status, overview)
WORKER_TTL_S = 30
#: how often a worker process writes its heartbeat (well inside ``WORKER_TTL_S``)
HEARTBEAT_INTERVAL_S = 5.0
#: life of a worker watchdog's write probe
PROBE_TTL_MS = 10_000
#: life of the webhook deliverer's lease: a leader that dies is replaced this long after its last
#: renewal at most (it renews every ``WEBHOOK_RENEW_S``)
WEBHOOK_LEASE_MS = 5000
WEBHOOK_RENEW_S = 1.0
#: upper bounds (ms) of the call latency buckets complete.lua counts, non-cumulatively
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
#: the timeline's rings (``worker.timeline``): per-second counts for this many seconds, then
#: per-minute counts for this many minutes
TIMELINE_SECONDS_KEPT = 600
TIMELINE_MINUTES_KEPT = 60
#: the series both rings count (in, succeeded, failed, calls, sampled depth), in the order the
#: per-second slot is emptied
TIMELINE_SERIES = ("in", "ok", "f", "c", "d")
#: summaries per bucket of a family, on average, before the family splits one more bucket (linear
#: hashing): buckets hold from half to the whole of it, far below ``hash-max-listpack-entries``
#: (512 by default), so that each stays a listpack and a lookup scans a short one
SUMMARY_LOAD = 128
#: the longest field or value a bucket holds (Redis's default ``hash-max-listpack-value``, 64: one
#: longer entry turns the whole bucket into a hashtable); a longer summary is kept in its family's
#: overflow hash ``P c:<start>:o``, with a one-byte stub in the bucket
SUMMARY_MAX_BYTES = 64
#: a family of summaries spans the status TTL / this, within the bounds below (s): a summary
#: outlives its TTL by at most one span, and a lookup by id reads one bucket per family
SUMMARY_SPANS_PER_TTL = 8
SUMMARY_SPAN_MIN_S = 60
SUMMARY_SPAN_MAX_S = 86400
#: a record's short state code -> the state's name (``worker.model.STATES``)
RECORD_STATES = {"q": "queued", "s": "sending", "v": "verifying", "r": "retrying",
                 "ok": "succeeded", "f": "failed"}

#: the Celery task names (wake-ups name the flush task; beat runs the sweep)
FLUSH_TASK = "tpns.flush"
SWEEP_TASK = "tpns.sweep"
#: checks an app's verifying items that are due (SPEC §6.1); a ``Wake`` of kind ``verify``
VERIFY_TASK = "tpns.verify"




def history_field(digest: str) -> bytes:
    """The field of a key's head in its history shard: the digest's last 7 hex digits, packed
    in 4 bytes (as ``lib.lua``'s ``h_field``)."""
    return bytes.fromhex("0" + digest[3:10])


def tagged_prefix(prefix: str, app: str) -> str:
    """The prefix of every key of ``app`` in cluster mode: ``P{app}:`` (the app as hash tag)."""
    return f"{prefix}{{{app}}}:"


def app_id(app: str, intent_id: str) -> str:
    """An intent id that carries its app (cluster mode): ``app.<id>``, unless it does already."""
    head = app + "."  # app names never contain a dot (settings), so the first one ends the app
    return intent_id if intent_id.startswith(head) else head + intent_id


def app_of_id(intent_id: str) -> str:
    """The app an id carries (cluster mode): the part before the first ``.``."""
    return intent_id.partition(".")[0]


def batch_nonce(nonce: str, app: str) -> str:
    """The nonce a claim puts at the end of its batch id; in cluster mode it ends in the app, so
    the batch's slot is known from its id alone (``b17.9ac3e0f1.android``)."""
    return f"{nonce}.{app}"


def app_of_batch(batch_id: str) -> str:
    """The app a cluster-mode batch id ends in (see ``batch_nonce``)."""
    return batch_id.split(".", 2)[-1]


@dataclass(frozen=True)
class Keys:
    """The key names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def tagged(self, app: str) -> Keys:
        """The keys of ``app`` in cluster mode: every one carries ``{app}`` (one slot)."""
        return Keys(tagged_prefix(self.prefix, app))

    def record(self, intent_id: str) -> str:
        return f"{self.prefix}{RECORD}{intent_id}"

    @property
    def summary_meta(self) -> str:
        """The families of summaries (compact terminal records)."""
        return self.prefix + SUMMARY_META

    def history(self, digest: str) -> str:
        """The history shard of a key's digest (its first 3 hex digits, as ``lib.lua``)."""
        return f"{self.prefix}{HISTORY}{digest[:3]}"

    @property
    def history_cursor(self) -> str:
        return self.prefix + HISTORY_CURSOR

    @property
    def events(self) -> str:
        return self.prefix + EVENTS

    @property
    def webhook(self) -> str:
        return self.prefix + WEBHOOK

    @property
    def webhook_lease(self) -> str:
        return self.prefix + WEBHOOK_LEASE

    def ready(self, app: str, operator_type: int) -> str:
        return f"{self.prefix}{READY}{app}:{operator_type}"

    def delayed(self, app: str, operator_type: int) -> str:
        return f"{self.prefix}{DELAYED}{app}:{operator_type}"

    def wake(self, app: str, operator_type: int) -> str:
        return f"{self.prefix}{WAKE}{app}:{operator_type}"

    def wake_linger(self, app: str, operator_type: int) -> str:
        return f"{self.prefix}{WAKE_LINGER}{app}:{operator_type}"

    def verifying(self, app: str) -> str:
        return f"{self.prefix}{VERIFYING}{app}"

    def wake_verify(self, app: str) -> str:
        return f"{self.prefix}{WAKE_VERIFY}{app}"

    def pause(self, app: str) -> str:
        return f"{self.prefix}{PAUSE}{app}"

    def move(self, app: str) -> str:
        """Set while the app's slot moves to another master (cluster mode): no enqueue writes."""
        return f"{self.prefix}{MOVE}{app}"

    def backoff(self, app: str) -> str:
        return f"{self.prefix}{BACKOFF}{app}"

    def rate(self, app: str) -> str:
        return f"{self.prefix}{RATE}{app}"

    def probe(self, host: str, pid: int) -> str:
        return f"{self.prefix}{PROBE}{host}:{pid}"

    @property
    def counters(self) -> str:
        return self.prefix + COUNTERS

    @property
    def metrics(self) -> str:
        return self.prefix + METRICS

    @property
    def timeline(self) -> list[str]:
        """The timeline's two rings, seconds then minutes (the last two ``KEYS`` of each script
        that counts in them)."""
        return [self.prefix + TIMELINE_SECONDS, self.prefix + TIMELINE_MINUTES]

    @property
    def failed(self) -> str:
        return self.prefix + FAILED

    @property
    def batches(self) -> str:
        return self.prefix + BATCHES

    @property
    def leases(self) -> str:
        return self.prefix + LEASES

    @property
    def seq(self) -> str:
        return self.prefix + SEQ

    @property
    def apps(self) -> str:
        return self.prefix + APPS

    @property
    def workers(self) -> str:
        return self.prefix + WORKERS

    @property
    def sweep_lock(self) -> str:
        return self.prefix + SWEEP_LOCK

    @property
    def flush_queue(self) -> str:
        """The Celery queue the wake-ups travel on."""
        return self.prefix + FLUSH_QUEUE

    @property
    def celery_prefix(self) -> str:
        """The prefix of a Redis broker's own keys (Celery's ``global_keyprefix``)."""
        return self.prefix + CELERY


def _lua(value: object) -> str:
    """``value`` as a Lua literal: strings (JSON's escapes are Lua's for these), numbers, and
    tables from mappings and sequences."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Iterable):
        return "{" + ", ".join(_lua(v) for v in value) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


#: what every script sees as Lua locals (names as in the scripts)
LUA_CONSTANTS: dict[str, object] = {
    "K_RECORD": RECORD, "K_KEY_INDEX": KEY_INDEX, "K_HISTORY": HISTORY,
    "K_SUMMARY": SUMMARY, "K_SUMMARY_META": SUMMARY_META, "SUMMARY_LOAD": SUMMARY_LOAD,
    "SUMMARY_MAX_BYTES": SUMMARY_MAX_BYTES,
    "SUMMARY_SPANS_PER_TTL": SUMMARY_SPANS_PER_TTL, "SUMMARY_SPAN_MIN_S": SUMMARY_SPAN_MIN_S,
    "SUMMARY_SPAN_MAX_S": SUMMARY_SPAN_MAX_S, "K_READY": READY, "K_DELAYED": DELAYED,
    "K_PAUSE": PAUSE, "K_BACKOFF": BACKOFF, "K_RATE": RATE, "K_WAKE": WAKE,
    "K_WAKE_LINGER": WAKE_LINGER, "K_VERIFYING": VERIFYING, "K_WAKE_VERIFY": WAKE_VERIFY,
    "WAKE_FLAG_MS": WAKE_FLAG_MS, "K_EVENTS_ADDED": EVENTS_ADDED_SUFFIX,
    "LAT_BUCKETS": LATENCY_BUCKETS_MS,
    "TL_SECONDS": TIMELINE_SECONDS_KEPT, "TL_MINUTES": TIMELINE_MINUTES_KEPT,
    "TL_SECOND_SERIES": TIMELINE_SERIES,
    "STATE_NAME": RECORD_STATES,
    "PENDING_STATES": PENDING_STATES,
    "OPERATOR_TYPES": OPERATOR_TYPES,
}


def lua_prelude() -> str:
    """The Lua lines the store puts before ``lib.lua`` and each script: the key prefix (ARGV[1])
    and every name and constant the scripts share with Python, declared once, here."""
    lines = ["-- generated from worker/keys.py at load time: do not spell these in the scripts",
             "local P = ARGV[1]"]
    lines += [f"local {name} = {_lua(value)}" for name, value in LUA_CONSTANTS.items()]
    return "\n".join(lines) + "\n"
