"""The TPNS sandbox: a local HTTP server that behaves like TPNS's account API (SPEC §9).

**An independent check of the client.** The sandbox imports nothing of the batcher's core: not
its signing (``worker.auth``), its validation (``worker.intents``, ``worker.model``), its errors or
its settings. It verifies signatures with its own code (tested against the published vector), has
its own error type and its own default credential pair, and reads the account-type table and the
codes as the service documents them. A check that shared the client's code would agree with the
client's mistakes. Code may depend on the sandbox (tools, tests, the CLI's ``sandbox`` command),
never the core. The import contract in pyproject.toml enforces this.

Modules, one job each: ``server`` (lifecycle, Python API, routing), ``api`` (the two TPNS
endpoints), ``protocol`` (paths, codes, request validation), ``state`` (bindings, counters),
``faults`` (what gets injected, and its answer), ``auth`` (signature and Basic verification, the
default pair), ``config`` (settings), ``transport`` (the HTTP server), ``command`` (the CLI command).

A shipped feature, so anyone can try tpns-batcher without credentials, and what the tests and the
benchmark talk to over real sockets::

    with SandboxServer(seed=1) as sandbox:          # or: tpns-batcher sandbox --port 8810
        requests.post(sandbox.url + "/v3/device/account/batchoperate", ...)

What it models (reference §9):

- ``POST /v3/device/account/batchoperate`` and ``POST /v3/device/account/query`` (any host).
- Both auth methods: the ``AccessId``/``TimeStamp``/``Sign`` headers (HMAC over the raw body,
  ``TimeStamp`` at most ``max_skew_s`` away from now; ``Sign`` wins when both are sent) and HTTP
  Basic. A failure is HTTP 200 with ret_code 1008003.
- Validation with the service's codes (see :mod:`worker.sandbox.protocol`). A token that starts with
  ``reject_token_prefix`` makes the whole call 1008007, so a client's "halve a rejected call" rule
  can be exercised; one that starts with ``invalid_token_prefix`` is answered ``"1008006"`` for that
  item (no state change for it), which gives 1008026 (some items failed) or 1008027 (all failed).
- Binding state, applied atomically per call. Interpretation of the operator types:
  ops 1 and 2 (1 has meant 2 since 2020) set, for each listed account, ``token[account_type] =
  account``: "override" replaces what the token had *for the account types named* and leaves its
  other types alone (the service keeps one account per type; the docs do not say that a bind clears
  the other types). Within one account_list, a later account of the same type wins. Op 3 removes
  each listed account from the token only when it is the one bound; op 4 removes every account of
  each token; op 5 removes each listed account (type 0 when absent) from all its tokens and answers
  ``"0"`` even when nothing was bound. A missing or empty required list is 1008002.
- The query API answers in camelCase (``retCode``/``errMsg``); each entry is ``"0"``, or
  ``"10110008"`` when nothing is bound. Its op 1 uses a top-level ``account_type`` as the default
  type of accounts that lack one. No item limit is applied to queries (none is documented).
- Fault injection on batchoperate only: with probability ``fault_rate`` (drawn from
  ``random.Random(seed)``, so a seed gives a reproducible sequence) one fault of ``faults``:
  ``http_500``/``http_503``/``http_429`` (that status; 429 with ``Retry-After``), ``1008004``,
  ``1008028`` (with ``Retry-After``), ``drop`` (the connection is closed without an answer) — none
  of these changes state — and ``timeout``: the call is processed normally but answered
  ``slow_ms`` late, like a real server whose answer is slower than the client's timeout (the change
  is applied on receipt, so a client retry can never be overtaken by it). ``latency_ms`` delays
  every answer of the two API paths. One more kind is drawn only when listed: ``lost``, answered
  as an accepted call (``"0"`` per item) and never applied, which only verification catches.
- Asynchrony: with ``apply_delay_ms`` (``--apply-delay-ms``) an accepted call is applied that much
  later, after every call accepted before it; until then queries see the old state (SPEC §6.1).
- Admin endpoints, sandbox-only and without auth (bind the sandbox to localhost):
  ``GET /healthz``, ``GET /sandbox/stats``, ``POST /sandbox/reset``, ``GET|POST /sandbox/config``.
"""
