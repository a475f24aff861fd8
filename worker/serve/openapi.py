"""The OpenAPI 3.1 document of ``tpns-batcher serve``, served at ``/openapi.json``.

Hand-written, because the routes are few and stable: one small builder per schema and per route,
assembled by ``openapi_schema``. tests/test_openapi.py fuzzes the live server against it, so a
route that answers outside this document fails there.
"""

from __future__ import annotations

from typing import Any

from ..events import EVENT_STATES
from ..keys import WORKER_TTL_S
from ..model import STATES
from .body import MAX_BODY_BYTES, MAX_INTENTS

Schema = dict[str, Any]

_OBJ: Schema = {"type": "object"}
_IDS: Schema = {"type": "array", "items": {"type": "string"}}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_schema() -> Schema:
    return {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def _intent_schema() -> Schema:
    account = {"type": "object", "required": ["account"],
               "properties": {"account": {"type": "string"}, "account_type": {"type": "integer"}}}
    return {"type": "object", "description": "An intent (SPEC §4)", "required": ["operator_type"],
            "properties": {
                "operator_type": {"type": "integer", "minimum": 1, "maximum": 5},
                "token": {"type": "string", "maxLength": 64},
                "account_list": {"type": "array", "maxItems": 20, "items": account},
                "account": {"type": "string"}, "account_type": {"type": "integer"},
                "app": {"type": "string"}, "id": {"type": "string", "maxLength": 64}}}


def _error_items() -> Schema:
    return {"type": "array", "items": {"type": "object", "properties": {
        "index": {"type": "integer"}, "line": {"type": ["integer", "null"]},
        "field": {"type": "string"},
        "reason": {"type": "string", "description": "field: rule"}}}}


def _result_schema() -> Schema:
    return {"type": "object", "required": ["ids", "errors", "accepted", "refused"], "properties": {
        "ids": {"type": "array", "items": {"type": ["string", "null"]},
                "description": "One per item in input order; null where refused"},
        "errors": _error_items(),
        "accepted": {"type": "integer"}, "refused": {"type": "integer"}}}


def _status_schema() -> Schema:
    text: Schema = {"type": ["string", "null"]}
    account = {"type": "object", "required": ["account", "account_type"],
               "properties": {"account": {"type": "string"}, "account_type": {"type": "integer"}}}
    payload = "Left out of a compacted status (`detail`)"
    return {"type": "object", "description": "An intent's status (SPEC §5)",
            "required": ["id", "operator_type", "state", "attempts", "result_code", "ret_code",
                         "err_msg", "error", "batch_id", "verified", "created_at", "updated_at"],
            "properties": {
                "id": {"type": "string"},
                "app": {"type": "string", "description": "Left out for the default app"},
                "operator_type": {"type": "integer", "minimum": 1, "maximum": 5},
                "token": {**text, "description": f"Operator types 1-4. {payload}"},
                "account_list": {"type": "array", "items": account,
                                 "description": f"Operator types 1-3. {payload}"},
                "account": {"type": "string", "description": f"Operator type 5. {payload}"},
                "account_type": {"type": "integer",
                                 "description": f"Operator type 5. {payload}"},
                "state": {"type": "string", "enum": list(STATES)},
                "attempts": {"type": "integer", "minimum": 0},
                "result_code": text, "ret_code": {"type": ["integer", "null"]},
                "err_msg": text, "error": text, "batch_id": text,
                "verified": {"type": ["boolean", "null"], "description": (
                    "With TPNS_VERIFY=on: true once a query showed the intent applied, false "
                    "while verifying (or never seen); null when verification is off")},
                "created_at": {"type": "string"}, "updated_at": {"type": "string"},
                "detail": {"type": "string", "enum": ["compacted"], "description": (
                    "Present once a succeeded intent is past TPNS_STATUS_DETAIL_S: only its "
                    "summary is kept for the rest of TPNS_STATUS_TTL_S, so the payload (token, "
                    "account_list, account, account_type) is left out; every other field stays")}}}


def _unauthorized() -> Schema:
    return _json(_error_schema(), "Bearer token missing or wrong (when TPNS_API_TOKEN is set)")


def _unavailable() -> Schema:
    """The 503 of every route that reads Redis: the error, its code, and the ids by fate."""
    body = {
        "type": "object", "required": ["error", "code", "stored", "refused", "in_doubt"],
        "properties": {
            "error": {"type": "string", "description": "The cause; the Redis URL without "
                                                       "its password"},
            "code": {"type": "string", "enum": ["store_unavailable", "queue_full"]},
            "stored": {**_IDS, "description": "Ids Redis stored"},
            "refused": {**_IDS, "description": "Ids not stored (refused whole, or never "
                                               "sent): safe to send again"},
            "in_doubt": {**_IDS, "description": "Ids whose reply was lost, or stored without "
                                                "the replicas' acknowledgement: look them up"},
            "errors": _error_items()}}
    return {
        "description": "Redis unreachable (`store_unavailable`) or back-pressure (`queue_full`: "
                       "TPNS_MAX_PENDING reached, or Redis out of memory). Retry after "
                       "`Retry-After` seconds; the server keeps serving.",
        "headers": {"Retry-After": {"description": "Seconds to wait before retrying",
                                    "schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": body}}}


def _post_intents() -> Schema:
    intent = _intent_schema()
    error = _error_schema()
    return {"post": {
        "summary": "Enqueue intents: one JSON object, a JSON array, or JSON Lines",
        "description": f"At most {MAX_BODY_BYTES} bytes and {MAX_INTENTS} intents. Each "
                       "item is accepted or refused on its own (200 either way).",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [
                intent, {"type": "array", "items": intent}]}},
            "application/x-ndjson": {"schema": {"type": "string"}},
            "application/jsonl": {"schema": {"type": "string"}}}},
        "responses": {"200": _json(_result_schema(), "Per-item results"),
                      "400": _json(error, "Empty or undecodable body"),
                      "401": _unauthorized(),
                      "413": _json(error, "Body or intent count over the limit"),
                      "415": _json(error, "Not JSON or JSON Lines"),
                      "503": _unavailable()}}}


def _get_intent() -> Schema:
    return {"get": {
        "summary": "The status of one intent",
        "parameters": [{"name": "intent_id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": _json(_status_schema(), "The status"), "401": _unauthorized(),
                      "404": _json(_error_schema(), "Unknown id"), "503": _unavailable()}}}


def _get_stats() -> Schema:
    return {"get": {
        "summary": "Counts per state and operator_type, queue depth, calls, pauses",
        "responses": {"200": _json(_OBJ, "The figures of `tpns-batcher stats --json`"),
                      "401": _unauthorized(), "503": _unavailable()}}}


def _healthz() -> Schema:
    return {"get": {
        "summary": f"Health: Redis answers, a worker was seen in {WORKER_TTL_S} s, nothing paused, the "
                   "webhook's lag under half of TPNS_EVENTS_MAXLEN",
        "security": [],  # open: load balancers and orchestrators probe it without the token
        "responses": {"200": _json(_OBJ, "Healthy (`degraded` says why when the webhook lags over "
                                         "a tenth of TPNS_EVENTS_MAXLEN)"),
                      "503": _json(_OBJ, "Unhealthy; `reason` says why")}}}


def _metrics() -> Schema:
    return {"get": {
        "summary": "Prometheus metrics of the whole cluster",
        "responses": {"200": {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "401": _unauthorized()}}}


def _openapi() -> Schema:
    return {"get": {
        "summary": "This document",
        "responses": {"200": _json(_OBJ, "OpenAPI 3.1"), "401": _unauthorized()}}}


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _bad_request() -> Schema:
    body = {"type": "object", "required": ["error", "field"],
            "properties": {"error": {"type": "string", "description": "field: rule"},
                           "field": {"type": "string"}}}
    return _json(body, "A parameter is missing or breaks its rule (`field` names it)")


def _get_history() -> Schema:
    body = {"type": "object", "required": ["intents"],
            "properties": {"intents": {"type": "array", "items": _status_schema(),
                                       "description": "Newest first; empty for an unknown key"}}}
    return {
        "summary": "History by key: the latest intents that named a token, or an account",
        "description": "Give `token`, or `account` (with `account_type`, default 0). Intents "
                       "are kept as long as their records (TPNS_STATUS_TTL_S).",
        "parameters": [
            _query("token", {"type": "string"}, "A device token"),
            _query("account", {"type": "string"}, "An account"),
            _query("account_type", {"type": "integer", "minimum": 0}, "The account's type"),
            _query("app", {"type": "string"}, "The app (default: TPNS_DEFAULT_APP)"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 500},
                   "At most this many (default 50)")],
        "responses": {"200": _json(body, "The intents, newest first"),
                      "400": _bad_request(), "401": _unauthorized(), "503": _unavailable()}}


def _get_events() -> Schema:
    return {"get": {
        "summary": "The events stream as Server-Sent Events",
        "description": "Every change of an intent to retrying, verifying, succeeded or failed: "
                       "`id:` is the stream id, `data:` the event as JSON. Where entries were "
                       "trimmed before they were read, an `event: gap` message names the first "
                       "id kept. Resumes after `Last-Event-ID` (over `from`). On a Redis "
                       "Cluster store without `app`, every app's stream merged in time order: "
                       "`id:` is then a cursor of every app's position "
                       "(`android:1764064800000-0,ios:1764064800000-2`).",
        "parameters": [
            _query("from", {"type": "string"}, "0 (all kept, the default), $ (only new), a "
                                               "stream id to resume after, or (merged) a cursor"),
            _query("state", {"type": "string", "enum": list(EVENT_STATES)}, "Only this state"),
            _query("follow", {"type": "boolean"}, "false: send what is kept, then close "
                                                  "(default true: keep sending)"),
            _query("app", {"type": "string"}, "On a Redis Cluster store, the app whose stream "
                                              "to read (each app has its own; without it, "
                                              "all merged)"),
            {"name": "Last-Event-ID", "in": "header", "required": False,
             "schema": {"type": "string"}, "description": "Resume after this id"}],
        "responses": {"200": {"description": "text/event-stream",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                      "400": _bad_request(), "401": _unauthorized(), "503": _unavailable()}}}


_HTML: Schema = {"text/html": {"schema": {"type": "string"}}}
_COOKIE: list[Schema] = [{"bearer": []}, {"session": []}]


def _status_page() -> Schema:
    return {"get": {
        "summary": "The live status page (HTML); `?id=` looks an intent up",
        "description": "With TPNS_API_TOKEN set and neither the bearer token nor a session "
                       "cookie: 401 with the sign-in form.",
        "security": [],
        "parameters": [{"name": "id", "in": "query", "required": False,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "HTML", "content": _HTML},
                      "401": {"description": "HTML: the sign-in form", "content": _HTML},
                      "404": {"description": "HTML; the looked-up id is unknown",
                              "content": _HTML},
                      "503": _unavailable()}}}


def _static() -> Schema:
    return {"get": {
        "summary": "The status page's script and stylesheet (shipped in the package)",
        "security": [],
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "page.js or page.css", "content": {
                          "text/javascript": {"schema": {"type": "string"}},
                          "text/css": {"schema": {"type": "string"}}}},
                      "404": _json(_error_schema(), "No such asset")}}}


def _signin() -> Schema:
    form = {"type": "object", "required": ["token"],
            "properties": {"token": {"type": "string", "description": "TPNS_API_TOKEN"}}}
    return {"post": {
        "summary": "Sign the status page in: the API token for a session cookie",
        "description": "Sets an HttpOnly, SameSite=Strict session cookie (12 h) and redirects "
                       "to `/`. The page then sends its CSRF token as X-CSRF-Token on "
                       "state-changing requests. 404 when no token is configured.",
        "security": [],
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": form}}},
        "responses": {"303": {"description": "Signed in: Set-Cookie, Location /"},
                      "401": {"description": "HTML: wrong token, the form again",
                              "content": _HTML},
                      "404": _json(_error_schema(), "No TPNS_API_TOKEN: nothing to sign in to"),
                      "413": _json(_error_schema(), "Body over 4 kB"),
                      "415": _json(_error_schema(), "Not a form")}}}


def _signout() -> Schema:
    body = {"type": "object", "properties": {"signed_out": {"type": "boolean"}}}
    return {"post": {
        "summary": "Sign the page out: clears the session cookie (needs X-CSRF-Token)",
        "responses": {"200": _json(body, "The cookie is cleared"), "401": _unauthorized(),
                      "403": _json(_error_schema(), "A session without its CSRF token")}}}


def _get_overview() -> Schema:
    return {"get": {
        "summary": "The status page's figures: stats, call classes, workers, recent failures",
        "responses": {"200": _json(_OBJ, "The figures"), "401": _unauthorized(),
                      "503": _unavailable()}}}


def _get_timeline() -> Schema:
    series = {"type": "array", "items": {"type": ["integer", "null"]}}
    unit = {"type": "object", "required": ["start", "step", "in", "succeeded", "failed",
                                           "calls", "depth"],
            "properties": {"start": {"type": "integer", "description": "Epoch s of the first"},
                           "step": {"type": "integer"}, "in": series, "succeeded": series,
                           "failed": series, "calls": series, "depth": series}}
    body = {"type": "object", "required": ["now", "seconds", "minutes"], "properties": {
        "now": {"type": "integer"}, "seconds": unit, "minutes": unit}}
    return {"get": {
        "summary": "The last hour as arrays: per second for 10 min, per minute for 60 min",
        "description": "Intents in and finished, calls, queue depth (sampled each second by "
                       "the sweep); per minute also calls by class, failures by reason and the "
                       "call latency p50/p99 (ms, bucket bounds).",
        "responses": {"200": _json(body, "The timeline"), "401": _unauthorized(),
                      "503": _unavailable()}}}


def _requeue_failed() -> Schema:
    body = {"type": "object", "properties": {"error": {
        "type": "string", "description": "Only failures with this error (default: all)"}}}
    done = {"type": "object", "required": ["requeued", "ids"],
            "properties": {"requeued": {"type": "integer"}, "ids": _IDS}}
    return {"post": {
        "summary": "Put failed intents back into the queue",
        "requestBody": {"required": False, "content": {"application/json": {"schema": body}}},
        "responses": {"200": _json(done, "The ids requeued"), "400": _bad_request(),
                      "401": _unauthorized(),
                      "413": _json(_error_schema(), "Body over 4 kB"),
                      "415": _json(_error_schema(), "Not application/json"),
                      "403": _json(_error_schema(), "A session without its CSRF token"),
                      "503": _unavailable()}}}


def openapi_schema() -> Schema:
    """OpenAPI 3.1 description of every route."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "tpns-batcher", "version": "1",
                 "description": "Enqueue TPNS account bind/unbind intents and watch them."},
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "tpns_session",
                        "description": "The status page's session (POST /signin)"}}},
        # scripts send the bearer token; the signed-in status page its session cookie
        "security": _COOKIE,
        "paths": {
            "/v1/intents": {**_post_intents(), "get": _get_history()},
            "/v1/intents/{intent_id}": _get_intent(),
            "/v1/events": _get_events(),
            "/v1/stats": _get_stats(),
            "/healthz": _healthz(),
            "/metrics": _metrics(),
            "/openapi.json": _openapi(),
            "/v1/overview": _get_overview(),
            "/v1/timeline": _get_timeline(),
            "/v1/requeue-failed": _requeue_failed(),
            "/": _status_page(),
            "/static/{name}": _static(),
            "/signin": _signin(),
            "/signout": _signout(),
        },
    }
