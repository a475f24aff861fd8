"""Every exception tpns-batcher raises on purpose.

    TpnsBatcherError                 root: catch this to catch everything below
    ├── ConfigError                  a setting is missing or has a bad value
    ├── IntentError                  an intent breaks a rule of SPEC §4 (refused, nothing stored)
    ├── IdConflictError              an ``id`` already exists with a different payload
    ├── StoreError                   Redis answered something the store did not expect
    ├── StoreUnavailableError        Redis is unreachable, or a reply was lost: try again later;
    │   │                            carries ``stored``, ``refused`` and ``in_doubt`` ids
    │   └── QueueFullError           ``queue_full``: TPNS_MAX_PENDING reached, or Redis is out of memory
    ├── WebhookError                 a POST to TPNS_WEBHOOK_URL got no 2xx (retried with backoff)
    └── TpnsError                    a call to TPNS did not succeed as a whole
        ├── LeaseSpentError          not sent: the batch's lease has too little time left
        ├── LeaseUnconfirmedError    not sent: Redis did not confirm the batch's lease is held
        ├── TransientError           worth retrying: the same call may succeed later
        │   ├── HttpStatusError      HTTP 5xx (or another non-2xx that is not 429)
        │   ├── RateLimitedError     HTTP 429 or ret_code 1008028; carries ``retry_after_s``
        │   ├── ServiceError         ret_code 1008004 (the service's internal call failed)
        │   ├── TransportError       timeout, refused or dropped connection
        │   ├── BadResponseError     a body that is not the JSON object TPNS sends
        │   └── UnexpectedRetCodeError  a ret_code that no rule of SPEC §6 names
        └── PermanentError           retrying the same call cannot help
            ├── RejectedError        ret_code 1008001/1008002/1008007: the call was malformed
            └── CredentialsError     ret_code 1008003/10030002/1008030/1008031/1010001

Retry policy is a type check: tenacity retries ``TransientError`` only; a producer retries a
``StoreUnavailableError`` later (the CLI exits 3 on it, ``serve`` answers 503 with ``Retry-After``).
No message or attribute ever carries the secret key, nor a Redis password.
"""

from __future__ import annotations


class TpnsBatcherError(Exception):
    """Root of every error raised by tpns-batcher."""


class ConfigError(TpnsBatcherError):
    """Raised when a setting is missing or invalid; ``str()`` is one line naming the variable."""

    def __init__(self, variable: str, reason: str) -> None:
        self.variable = variable
        self.reason = reason
        super().__init__(f"{variable}: {reason}")


class IntentError(TpnsBatcherError):
    """Raised when an intent is refused at enqueue; names the field and the rule it breaks."""

    def __init__(self, field: str, rule: str, line: int | None = None) -> None:
        self.field = field
        self.rule = rule
        self.line = line
        super().__init__(f"{field}: {rule}" if line is None else f"line {line}: {field}: {rule}")

    @property
    def reason(self) -> str:
        """The message without its line number: ``"token: must not be empty"``."""
        return f"{self.field}: {self.rule}"


class IdConflictError(IntentError):
    """Raised when an ``id`` is enqueued again with a payload different from the stored one."""

    def __init__(self, intent_id: str, line: int | None = None) -> None:
        super().__init__("id", f"{intent_id!r} already exists with a different payload", line)
        self.intent_id = intent_id


class StoreError(TpnsBatcherError):
    """Raised when Redis holds or returns something the store's scripts did not expect."""


class StoreUnavailableError(TpnsBatcherError):
    """Raised by a producer when Redis could not take or answer a call: unreachable, a connection
    dropped before the reply, a replica gone read-only after a failover, a disk error, or a
    ``WAIT`` for replicas that timed out.

    Ids are assigned before sending, so every intent of the call is in one group:

    * ``stored``: Redis acknowledged them (new, or already there with the same payload);
    * ``refused``: not stored: Redis refused them whole, or they were never sent — safe to send
      again;
    * ``in_doubt``: sent, but the reply was lost (the call may or may not have run), or stored on
      the primary without the replicas' acknowledgement; look them up by id.

    ``result`` is the ``BulkResult`` of the call (input order: the stored ids, and the refusals by
    the input rules) when the call was an enqueue. The message names the Redis URL without its
    password, and the cause.
    """

    #: short machine-readable reason (the HTTP error body's ``code``)
    code: str = "store_unavailable"

    def __init__(self, url: str, cause: str, *, stored: list[str] | None = None,
                 refused: list[str] | None = None, in_doubt: list[str] | None = None,
                 result: object = None, retry_after_s: int = 1) -> None:
        self.url = url
        self.cause = cause
        self.stored = list(stored or ())
        self.refused = list(refused or ())
        self.in_doubt = list(in_doubt or ())
        self.result = result
        #: when a retry makes sense (the HTTP ``Retry-After``)
        self.retry_after_s = retry_after_s
        super().__init__(self._message())

    def _message(self) -> str:
        counts = ""
        if self.stored or self.refused or self.in_doubt:
            counts = (f" ({len(self.stored)} stored, {len(self.refused)} not stored, "
                      f"{len(self.in_doubt)} in doubt)")
        return f"Redis at {self.url} unavailable: {self.cause}{counts}"


class QueueFullError(StoreUnavailableError):
    """Raised when new intents are refused for back-pressure (``queue_full``): the pending intents
    (queued, retrying, sending) reached ``TPNS_MAX_PENDING``, or Redis answered ``OOM`` (its
    ``maxmemory``). Nothing of a refused intent was written."""

    code = "queue_full"

    def _message(self) -> str:
        return f"queue_full: {super()._message()}"


class WebhookError(TpnsBatcherError):
    """Raised when a webhook POST got no 2xx answer in time; ``str()`` says what it got (a status
    or the transport error's class), never the URL's credentials nor the secret."""


class TpnsError(TpnsBatcherError):
    """Raised when a call to TPNS failed as a whole (not item by item)."""

    #: short machine-readable reason written into statuses (``http_503``, ``timeout``, ...)
    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None, ret_code: int | None = None,
                 http_status: int | None = None, err_msg: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.ret_code = ret_code
        self.http_status = http_status
        self.err_msg = err_msg


class LeaseSpentError(TpnsError):
    """Raised instead of starting an HTTP attempt that could still be running when the batch's
    lease ends (its items would be sent again meanwhile, and a late call could overtake a later
    intent on the same key). Not retried in the call; the items go back with a backoff."""

    code = "lease_spent"


class LeaseUnconfirmedError(TpnsError):
    """Raised instead of starting an HTTP attempt when Redis does not confirm, just before it,
    that the batch's lease is still this worker's: Redis is unreachable, or its lease is gone (a
    restart or failover lost the claim, or it expired and another worker may hold the items).
    Not retried in the call; an item whose lease is gone gets its outcome from its new holder."""

    code = "lease_unconfirmed"


class TransientError(TpnsError):
    """Raised when a call failed in a way that the same call may not fail again later."""


class HttpStatusError(TransientError):
    """Raised on an HTTP status other than 2xx and 429 (``code`` is ``http_<status>``)."""


class RateLimitedError(TransientError):
    """Raised on HTTP 429 or ret_code 1008028; ``retry_after_s`` is the server's hint, if any."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class ServiceError(TransientError):
    """Raised on ret_code 1008004: the service failed to call one of its own parts."""

    code = "service_error"


class TransportError(TransientError):
    """Raised on a timeout, a refused connection or a connection dropped mid-call."""

    code = "connection_error"


class BadResponseError(TransientError):
    """Raised when the body is not a JSON object with an integer ``ret_code``."""

    code = "bad_response"


class UnexpectedRetCodeError(TransientError):
    """Raised on a call-level ret_code that no outcome rule names (``code`` is ``ret_<code>``)."""


class PermanentError(TpnsError):
    """Raised when retrying the very same call cannot succeed."""


class RejectedError(PermanentError):
    """Raised on ret_code 1008001, 1008002 or 1008007: the service refused the call as malformed."""


class CredentialsError(PermanentError):
    """Raised on credential, billing or app-lifecycle codes: sending for the app must pause."""
