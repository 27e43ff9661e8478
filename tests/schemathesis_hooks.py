"""The one server-error rule the fuzzer in tests/openapi.rs applies.

The hub is a gateway to brokers: a waited call answers 502
`broker_failed` when the broker reported failure, and 504 `timeout` when
no outcome came within the caller's `timeout_secs`, each with the
dispatch's id, as the API documents. Those are outcomes of the broker,
not errors of the hub. Every other 5xx (500 `internal`, 503, a 502 or 504
without that code and a dispatch id) is a failure.
"""

import schemathesis

GATEWAY_OUTCOMES = {(502, "broker_failed"), (504, "timeout")}


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
