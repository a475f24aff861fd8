"""Verification (SPEC §6.1) as plain functions: which queries can show that an accepted item was
applied, and whether their answers show it.

TPNS applies ``batchoperate`` asynchronously; ``POST /v3/device/account/query`` reads the
bindings (reference §7): query op 1 maps accounts to tokens (each answer entry names the
account's type), query op 2 maps tokens to accounts (the documented answer may leave the types
out). What each operator_type's postcondition reads:

=====  =================================================================  ==================
op     postcondition                                                      read with
=====  =================================================================  ==================
1, 2   every listed (account, type) is bound to the token (the last       op 1 per account
       listed account of each type: the service keeps one per type)
2      and no other account of a listed type is on the token, where the   op 2 for the token
       answer reports types (best-effort: entries without a type are
       not judged)
3      none of the listed accounts is bound to the token                  op 1 per account
4      the token has no account                                           op 2 for the token
5      the account is bound to no token                                   op 1 for the account
=====  =================================================================  ==================

The positive checks use query op 1 because its answer always carries the type, so "bound to the
token" is exact whatever op 2 leaves out. Keys are held until an item is verified, so a later
intent on the same key cannot change what the check reads: per-intent checks make the whole
sequence right.

No I/O here: ``plan`` says which query calls to make (≤ 20 accounts or tokens each),
``read_answer`` records what one answer shows, and ``shown`` judges an item from that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import Account

#: query operator_types (reference §7)
QUERY_ACCOUNTS = 1  # accounts -> tokens
QUERY_TOKENS = 2  # tokens -> accounts
#: accounts or tokens per query call (the batchoperate limit; none is documented for queries)
MAX_PER_QUERY = 20
#: an entry's code when nothing is bound to it ("no token, no account")
NOTHING_BOUND = "10110008"
_FOUND = frozenset({"0", "ok"})

AccountKey = tuple[str, int]


@dataclass(frozen=True)
class Subject:
    """What verifying one item needs to know of it."""

    operator_type: int
    token: str | None
    accounts: tuple[Account, ...]


@dataclass(frozen=True)
class Needs:
    """The accounts (query op 1) and tokens (query op 2) whose bindings an item's check reads."""

    accounts: tuple[AccountKey, ...] = ()
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryCall:
    """One query call: accounts for query op 1, or tokens for query op 2."""

    operator_type: int
    accounts: tuple[AccountKey, ...] = ()
    tokens: tuple[str, ...] = ()

    def body(self) -> dict[str, Any]:
        """The request body (every account with its type, so op 1 needs no default type)."""
        if self.operator_type == QUERY_ACCOUNTS:
            return {"operator_type": QUERY_ACCOUNTS,
                    "account_list": [{"account": a, "account_type": t} for a, t in self.accounts]}
        return {"operator_type": QUERY_TOKENS, "token_list": list(self.tokens)}

    @property
    def size(self) -> int:
        return len(self.accounts) + len(self.tokens)


@dataclass
class Observed:
    """What query answers showed. A key missing from a map was not seen (its call failed, or the
    answer left it out): an item that needs it is not shown yet."""

    #: (account, type) -> the tokens bound to it
    tokens_of: dict[AccountKey, frozenset[str]] = field(default_factory=dict)
    #: token -> its accounts, each with its type or None when the answer left the type out
    accounts_of: dict[str, tuple[tuple[str, int | None], ...]] = field(default_factory=dict)


def effective(accounts: Iterable[Account]) -> dict[int, str]:
    """type -> the account a bind leaves bound: the last listed one of each type."""
    out: dict[int, str] = {}
    for acct in accounts:
        out[acct.account_type] = acct.account
    return out


def needs(subject: Subject) -> Needs:
    """The bindings ``subject``'s postcondition reads (see the module's table)."""
    op = subject.operator_type
    if op in (1, 2):
        keys = tuple((a, t) for t, a in effective(subject.accounts).items())
        tokens = (subject.token,) if op == 2 and subject.token else ()
        return Needs(keys, tokens)
    if op in (3, 5):
        return Needs(tuple(dict.fromkeys((a.account, a.account_type) for a in subject.accounts)))
    if op == 4 and subject.token:
        return Needs(tokens=(subject.token,))
    raise ValueError(f"cannot verify operator_type {op!r} with token {subject.token!r}")


def plan(wanted: Iterable[Needs], max_per_call: int = MAX_PER_QUERY) -> list[QueryCall]:
    """The fewest query calls that read every account and token ``wanted`` (each once)."""
    accounts: dict[AccountKey, None] = {}
    tokens: dict[str, None] = {}
    for need in wanted:
        accounts.update(dict.fromkeys(need.accounts))
        tokens.update(dict.fromkeys(need.tokens))
    acc, tok = list(accounts), list(tokens)
    return ([QueryCall(QUERY_ACCOUNTS, accounts=tuple(acc[k:k + max_per_call]))
             for k in range(0, len(acc), max_per_call)]
            + [QueryCall(QUERY_TOKENS, tokens=tuple(tok[k:k + max_per_call]))
               for k in range(0, len(tok), max_per_call)])


def read_answer(call: QueryCall, data: Mapping[str, Any], into: Observed) -> int:
    """Record in ``into`` what the answer ``data`` (retCode 0, 1008026 or 1008027) to ``call``
    shows; returns how many of the call's keys it showed.

    A key counts as shown when its answer entry is found (matched by name, and type when the
    entry has one) with a success code, or when its ``result`` code says nothing is bound. Any
    other code leaves it unseen: it is asked again at the next check.
    """
    raw = data.get("result")
    result = [str(c) for c in raw] if isinstance(raw, list) else []
    if not result and data.get("retCode", data.get("ret_code")) == int(NOTHING_BOUND):
        # the whole call answered "no token, no account": nothing is bound to any key asked
        result = [NOTHING_BOUND] * call.size
    if call.operator_type == QUERY_ACCOUNTS:
        entries = _entries(data.get("account_tokens"))
        for index, key in enumerate(call.accounts):
            code = result[index] if index < len(result) else None
            entry = _account_entry(entries, key, index)
            if code == NOTHING_BOUND:
                into.tokens_of[key] = frozenset()
            elif entry is not None and (code is None or code in _FOUND):
                listed = entry.get("token_list") or []
                if isinstance(listed, list):
                    into.tokens_of[key] = frozenset(str(t) for t in listed)
        return sum(key in into.tokens_of for key in call.accounts)
    entries = _entries(data.get("token_accounts"))
    for index, token in enumerate(call.tokens):
        code = result[index] if index < len(result) else None
        entry = _token_entry(entries, token, index)
        if code == NOTHING_BOUND:
            into.accounts_of[token] = ()
        elif entry is not None and (code is None or code in _FOUND):
            listed = entry.get("account_list") or []
            if isinstance(listed, list):
                into.accounts_of[token] = tuple(_account_of(a) for a in listed
                                                if isinstance(a, dict))
    return sum(token in into.accounts_of for token in call.tokens)


def _entries(value: Any) -> list[dict[str, Any]]:
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def _account_entry(entries: Sequence[dict[str, Any]], key: AccountKey,
                   index: int) -> dict[str, Any] | None:
    """The entry answering ``key``: the one with its name and type; one with its name and no
    type only at the same index as the request (the EN example leaves types out)."""
    for entry in entries:
        if entry.get("account") == key[0] and entry.get("account_type") == key[1]:
            return entry
    if index < len(entries):
        entry = entries[index]
        if entry.get("account") == key[0] and entry.get("account_type") is None:
            return entry
    return None


def _token_entry(entries: Sequence[dict[str, Any]], token: str,
                 index: int) -> dict[str, Any] | None:
    if index < len(entries) and entries[index].get("token") == token:
        return entries[index]
    return next((e for e in entries if e.get("token") == token), None)


def _account_of(entry: Mapping[str, Any]) -> tuple[str, int | None]:
    kind = entry.get("account_type")
    return (str(entry.get("account")),
            kind if isinstance(kind, int) and not isinstance(kind, bool) else None)


def shown(subject: Subject, seen: Observed) -> bool:
    """Whether what was seen shows ``subject``'s postcondition (False also when a binding it
    reads was not seen)."""
    op, token = subject.operator_type, subject.token
    need = needs(subject)
    if any(k not in seen.tokens_of for k in need.accounts) or \
            any(t not in seen.accounts_of for t in need.tokens):
        return False
    if op in (1, 2):
        if not all(token in seen.tokens_of[k] for k in need.accounts):
            return False
        if op == 2 and token is not None:
            wanted = effective(subject.accounts)
            # best-effort exclusivity: only entries that carry their type can be judged
            return all(wanted[kind] == account for account, kind in seen.accounts_of[token]
                       if kind is not None and kind in wanted)
        return True
    if op == 3:
        return all(token not in seen.tokens_of[k] for k in need.accounts)
    if op == 4:
        return token is not None and not seen.accounts_of[token]
    return not seen.tokens_of[need.accounts[0]]
