"""The fuzzer's two rules of this API (tests/openapi.rs).

1. Waits are short. A call that waits for its broker (`?wait=true`, the
   default of lifecycle calls and operations) waits up to `timeout_secs`
   (60 by default, up to 3,600): a generated call on an agent whose broker
   is offline would hold its connection that long, past the fuzzer's read
   timeout. The waiting operations get `timeout_secs` of at most
   MAX_WAIT_SECS; values that are not integers are left for the hub to
   refuse.

2. The server-error rule, below.

The hub is a gateway to brokers: a waited call answers 502
`broker_failed` when the broker reported failure, and 504 `timeout` when
no outcome came within the caller's `timeout_secs`, each with the
dispatch's id, as the API documents. Those are outcomes of the broker,
not errors of the hub. Every other 5xx (500 `internal`, 503, a 502 or 504
without that code and a dispatch id) is a failure.
"""

import schemathesis

GATEWAY_OUTCOMES = {(502, "broker_failed"), (504, "timeout")}

MAX_WAIT_SECS = 2
WAITING = {
    ("POST", "/v1/agents"),
    ("DELETE", "/v1/agents/{agent}"),
    ("POST", "/v1/agents/{agent}/start"),
    ("POST", "/v1/agents/{agent}/stop"),
    ("POST", "/v1/agents/{agent}/restart"),
    ("POST", "/v1/agents/{agent}/ops/{name}"),
    ("POST", "/v1/brokers/{broker}/ops/{name}"),
}


@schemathesis.hook
def map_query(ctx, query):
    operation = ctx.operation
    if operation is None or (str(operation.method).upper(), operation.path) not in WAITING:
        return query
    query = dict(query or {})
    wait = query.get("timeout_secs")
    if wait is None or (isinstance(wait, int) and wait > MAX_WAIT_SECS):
        query["timeout_secs"] = MAX_WAIT_SECS
    return query


@schemathesis.check
def no_server_error_but_broker_outcomes(ctx, response, case):
    status = response.status_code
    if status < 500:
        return
    try:
        error = response.json().get("error", {})
    except Exception:  # not JSON: certainly not a documented outcome
        error = {}
    if (status, error.get("code")) in GATEWAY_OUTCOMES and error.get("dispatch_id"):
        return
    raise AssertionError(f"server error {status}: {response.text[:300]}")
