"""The sandbox's state: the bindings TPNS would hold, and the counters of what it was sent.

The bindings are two indexes kept consistent under one lock: token → {account_type → account} (one
account per type per token) and (account, account_type) → set of tokens. A whole call is applied
under the lock, so concurrent calls never interleave item by item.

Like the service, which applies batchoperate asynchronously, an accepted call may be applied
``delay_s`` later: it waits in a first-in first-out line, and every read (and every later call)
first applies the calls whose time has come, so readers see the old state until then and calls
take effect in the order they were accepted.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from .protocol import BATCH_FIELDS, INVALID_TOKEN, Item, Refusal, Request

#: how many recent call sizes ``Stats.snapshot()["items_per_call"]`` keeps
ITEMS_PER_CALL_KEPT = 10_000
#: how many recently applied items ``Bindings.applied()`` keeps
APPLIED_KEPT = 100_000


class Bindings:
    """Token ↔ account bindings, thread-safe. Reads return copies."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._by_token: dict[str, dict[int, str]] = {}
        self._by_account: dict[tuple[str, int], set[str]] = {}
        #: the items that changed (or were applied to) the state, in the order applied
        self._applied: deque[tuple[int, Item]] = deque(maxlen=APPLIED_KEPT)
        #: accepted calls not applied yet: (when, operator_type, items), oldest first
        self._later: deque[tuple[float, int, tuple[Item, ...]]] = deque()

    def apply(self, request: Request, invalid_token_prefix: str, *, delay_s: float = 0.0,
              lost: bool = False) -> list[str]:
        """Accept a validated batchoperate call; the per-item result codes.

        The accepted items are applied atomically, now or ``delay_s`` later (after every call
        accepted before them); ``lost`` answers the same codes and never applies them.
        """
        results: list[str] = []
        accepted: list[Item] = []
        with self._lock:
            self._settle()
            for item in request.items:
                if item.token is not None and invalid_token_prefix and \
                        item.token.startswith(invalid_token_prefix):
                    results.append(INVALID_TOKEN)
                    continue
                accepted.append(item)
                results.append("0")
            if lost or not accepted:
                return results
            if delay_s > 0 or self._later:
                self._later.append((self._clock() + delay_s, request.operator_type,
                                    tuple(accepted)))
            else:
                self._apply_call(request.operator_type, accepted)
        return results

    def _apply_call(self, op: int, items: Iterable[Item]) -> None:
        for item in items:
            self._apply_item(op, item)
            self._applied.append((op, item))

    def _settle(self) -> None:
        """Apply the accepted calls whose time has come, in the order accepted (lock held)."""
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            _, op, items = self._later.popleft()
            self._apply_call(op, items)

    def pending(self) -> int:
        """Accepted calls not applied yet."""
        with self._lock:
            self._settle()
            return len(self._later)

    def _apply_item(self, op: int, item: Item) -> None:
        if op == 5:
            key = (item.accounts[0].account, item.accounts[0].account_type)
            for token in self._by_account.pop(key, set()):
                self._forget(token, key[1])
            return
        assert item.token is not None
        token = item.token
        if op == 4:
            for account_type in list(self._by_token.get(token, {})):
                self._unbind(token, account_type)
            return
        for acct in item.accounts:
            bound = self._by_token.get(token, {}).get(acct.account_type)
            if op == 3:
                if bound == acct.account:
                    self._unbind(token, acct.account_type)
            elif bound != acct.account:
                if bound is not None:
                    self._unbind(token, acct.account_type)
                self._by_token.setdefault(token, {})[acct.account_type] = acct.account
                self._by_account.setdefault((acct.account, acct.account_type), set()).add(token)

    def _unbind(self, token: str, account_type: int) -> None:
        account = self._forget(token, account_type)
        tokens = self._by_account.get((account, account_type))
        if tokens is not None:
            tokens.discard(token)
            if not tokens:
                del self._by_account[(account, account_type)]

    def _forget(self, token: str, account_type: int) -> str:
        accounts = self._by_token[token]
        account = accounts.pop(account_type)
        if not accounts:
            del self._by_token[token]
        return account

    def accounts_of(self, token: str) -> dict[int, str]:
        """account_type → account bound to ``token`` (empty when none)."""
        with self._lock:
            self._settle()
            return dict(self._by_token.get(token, {}))

    def tokens_of(self, account: str, account_type: int = 0) -> set[str]:
        """The tokens bound to ``account`` of ``account_type``."""
        with self._lock:
            self._settle()
            return set(self._by_account.get((account, account_type), set()))

    def snapshot(self, tokens: Iterable[str]) -> dict[str, dict[int, str]]:
        """The accounts of several tokens, read at one instant."""
        with self._lock:
            self._settle()
            return {t: dict(self._by_token.get(t, {})) for t in tokens}

    def applied(self) -> list[tuple[int, Item]]:
        """``(operator_type, item)`` of every item applied (answered ``"0"``), oldest first (the
        last ``APPLIED_KEPT``): the order in which the service saw each key change."""
        with self._lock:
            self._settle()
            return list(self._applied)

    def clear(self) -> None:
        """Forget every binding, and the calls not applied yet."""
        with self._lock:
            self._later.clear()
            self._by_token.clear()
            self._by_account.clear()
            self._applied.clear()

    def __len__(self) -> int:
        """The number of (token, account_type) bindings."""
        with self._lock:
            self._settle()
            return sum(len(accounts) for accounts in self._by_token.values())


class Stats:
    """The sandbox's counters (see ``SandboxServer.stats``), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = self.queries = self.items = self.max_items = 0
            self.by_op: Counter[str] = Counter()
            self.ret_codes: Counter[str] = Counter()
            self.faults: Counter[str] = Counter()
            self.per_call: deque[int] = deque(maxlen=ITEMS_PER_CALL_KEPT)
            #: the operator_type of each call in ``per_call`` (None when the body had none)
            self.per_call_op: deque[int | None] = deque(maxlen=ITEMS_PER_CALL_KEPT)
            #: batchoperate requests received and not yet answered, and the most seen at once
            #: (``reset`` keeps the calls still in flight counted, so the two stay consistent)
            self.in_flight_max = self.in_flight

    def call(self, payload: dict[str, Any] | Refusal) -> None:
        op = payload.get("operator_type") if isinstance(payload, dict) else None
        entries = payload.get(BATCH_FIELDS[op]) if type(op) is int and op in BATCH_FIELDS \
            and isinstance(payload, dict) else None
        with self._lock:
            self.calls += 1
            if type(op) is int and op in BATCH_FIELDS:
                self.by_op[str(op)] += 1
            if isinstance(entries, list):
                self.items += len(entries)
                self.max_items = max(self.max_items, len(entries))
                self.per_call.append(len(entries))
                self.per_call_op.append(op)

    def entered(self) -> None:
        """A batchoperate request arrived (counted until ``left``)."""
        with self._lock:
            self.in_flight += 1
            self.in_flight_max = max(self.in_flight_max, self.in_flight)

    def left(self) -> None:
        """A batchoperate request was answered (or its connection dropped)."""
        with self._lock:
            self.in_flight -= 1

    def count(self, *, ret_code: int | None = None, fault: str | None = None,
              query: bool = False) -> None:
        with self._lock:
            if ret_code is not None:
                self.ret_codes[str(ret_code)] += 1
            if fault is not None:
                self.faults[fault] += 1
            self.queries += query

    def call_sizes(self) -> list[tuple[int | None, int]]:
        """``(operator_type, items)`` of each call counted in ``items_per_call``, oldest first."""
        with self._lock:
            return list(zip(self.per_call_op, self.per_call, strict=True))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": self.calls, "queries": self.queries, "items": self.items,
                    "calls_by_op": dict(self.by_op), "ret_codes": dict(self.ret_codes),
                    "faults": dict(self.faults), "max_items_per_call": self.max_items,
                    "items_per_call": list(self.per_call), "in_flight": self.in_flight,
                    "in_flight_max": self.in_flight_max}
