"""The two TPNS endpoints as the sandbox answers them: batchoperate and query.

Order of a batchoperate call: count it, draw a fault, check auth, validate, reject by token
prefix, then apply it to the bindings atomically. Query answers in camelCase, as the service does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .auth import authorized
from .config import SandboxConfig
from .faults import FaultDraw, fault_reply, fault_ret_code
from .protocol import (
    AUTH_FAILURE,
    ERR_MSG,
    INVALID_PARAMETER,
    NOTHING_BOUND,
    Refusal,
    batch_code,
    parse_batch,
    parse_body,
    parse_query,
)
from .state import Bindings, Stats
from .transport import Reply, json_reply


class TpnsApi:
    """Answers batchoperate and query calls over ``bindings``, counting into ``stats``."""

    def __init__(self, bindings: Bindings, stats: Stats, faults: FaultDraw,
                 clock: Callable[[], float] = time.time) -> None:
        self.bindings = bindings
        self.stats = stats
        self.faults = faults
        self._clock = clock

    def batchoperate(self, config: SandboxConfig, headers: dict[str, str], body: bytes) -> Reply:
        payload = parse_body(body)
        self.stats.call(payload)
        delay_s = config.latency_ms / 1000
        fault = self.faults.draw(config)
        if fault is not None:
            self.stats.count(fault=fault, ret_code=fault_ret_code(fault))
            if fault == "lost":  # answered like any accepted call, never applied
                reply = self._batch_answer(config, headers, body, payload, lost=True)
                reply.delay_s = delay_s
                return reply
            if fault != "timeout":
                reply = fault_reply(fault, config.retry_after_s)
                reply.delay_s = delay_s
                return reply
            delay_s += config.slow_ms / 1000
        reply = self._batch_answer(config, headers, body, payload)
        reply.delay_s = delay_s
        return reply

    def query(self, config: SandboxConfig, headers: dict[str, str], body: bytes) -> Reply:
        self.stats.count(query=True)
        reply = self._query_answer(config, headers, body)
        reply.delay_s = config.latency_ms / 1000
        return reply

    def _authorized(self, config: SandboxConfig, headers: dict[str, str], body: bytes) -> bool:
        return authorized(headers, body, access_id=config.access_id,
                          secret_key=config.secret_key, max_skew_s=config.max_skew_s,
                          now_s=self._clock())

    def _ret(self, ret_code: int, err_msg: str, result: list[str] | None = None) -> Reply:
        self.stats.count(ret_code=ret_code)
        return json_reply({"ret_code": ret_code, "err_msg": err_msg, "result": result or []})

    def _batch_answer(self, config: SandboxConfig, headers: dict[str, str], body: bytes,
                      payload: dict[str, Any] | Refusal, *, lost: bool = False) -> Reply:
        if not self._authorized(config, headers, body):
            return self._ret(AUTH_FAILURE, ERR_MSG[AUTH_FAILURE])
        request = payload if isinstance(payload, Refusal) else parse_batch(payload)
        if isinstance(request, Refusal):
            return self._ret(request.ret_code, request.err_msg)
        prefix = config.reject_token_prefix
        rejected = [t for t in request.tokens if prefix and t.startswith(prefix)]
        if rejected:
            return self._ret(INVALID_PARAMETER,
                             f"invalid parameter: token {rejected[0]!r} is rejected (sandbox)")
        result = self.bindings.apply(request, config.invalid_token_prefix,
                                     delay_s=config.apply_delay_ms / 1000, lost=lost)
        return self._ret(*batch_code(result), result)

    def _query_answer(self, config: SandboxConfig, headers: dict[str, str],
                      body: bytes) -> Reply:
        if not self._authorized(config, headers, body):
            return json_reply({"retCode": AUTH_FAILURE, "errMsg": ERR_MSG[AUTH_FAILURE],
                               "result": []})
        payload = parse_body(body)
        request = payload if isinstance(payload, Refusal) else parse_query(payload)
        if isinstance(request, Refusal):
            return json_reply({"retCode": request.ret_code, "errMsg": request.err_msg,
                               "result": []})
        out: dict[str, Any]
        if request.operator_type == 1:
            entries = []
            for item in request.items:
                acct = item.accounts[0]
                tokens = sorted(self.bindings.tokens_of(acct.account, acct.account_type))
                entries.append({"account": acct.account, "account_type": acct.account_type,
                                "token_list": tokens})
            result = ["0" if e["token_list"] else NOTHING_BOUND for e in entries]
            out = {"account_tokens": entries}
        else:
            bound = self.bindings.snapshot(request.tokens)
            out = {"token_accounts": [
                {"token": token, "account_list": [{"account": bound[token][t], "account_type": t}
                                                  for t in sorted(bound[token])]}
                for token in request.tokens]}
            result = ["0" if bound[token] else NOTHING_BOUND for token in request.tokens]
        ret_code, err_msg = batch_code(result)
        return json_reply({"retCode": ret_code, "errMsg": err_msg, "result": result, **out})
