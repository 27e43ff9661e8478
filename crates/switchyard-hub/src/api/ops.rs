//! `/v1/agents/{agent}/ops/{name}`: named operations that answer.
//!
//! A call is a dispatch intent with op `call`, the operation's name and its
//! `args`, written, routed, ordered and waited for exactly like a lifecycle
//! call (the originator's `lifecycle`). This file checks the name and the
//! arguments and maps the outcome: 200 with the dispatch (its `result` is
//! what the broker's runtime answered), 202 when not waiting, 404
//! `unknown_operation` or `not_found` and 422 `invalid_args` when the
//! runtime said so, 502 for any other failure, 504 when the window passed
//! without progress.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_proto::{AgentSpec, INVALID_ARGS, UNKNOWN_OPERATION};
use switchyard_store::DispatchIntent;
use utoipa::ToSchema;

use super::agents::{Accepted, LifecycleQuery, answer as lifecycle_answer};
use super::error::{ApiError, ErrorBody};
use super::openapi::IdempotencyKey;
use super::request::{Path, Query};
use super::{ApiJson, idempotency_key};
use crate::idempotency::Entry;
use crate::lookup;
use crate::originator::{Ask, Lifecycle, Wait};
use crate::state::HubState;

/// The body of an operation call; no body at all is `{}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallBody {
    /// The operation's arguments: a JSON object (`{}` when absent).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    args: Option<Value>,
}

#[utoipa::path(
    post, path = "/v1/agents/{agent}/ops/{name}", operation_id = "call_agent_operation", tag = "operations",
    params(
        ("agent" = String, Path, description = "The agent's id or name", example = "worker"),
        ("name" = String, Path, description = "The operation: a lowercase letter, then lowercase letters, digits, `.`, `_` or `-`; at most 64", pattern = "^[a-z][a-z0-9._-]{0,63}$"),
        LifecycleQuery,
        IdempotencyKey,
    ),
    request_body(content = Option<CallBody>, content_type = "application/json"),
    responses(
        (status = 200, description = "The runtime answered: the finished dispatch, whose `result` is its answer", body = DispatchIntent),
        (status = 202, description = "With `?wait=false`: the dispatch written", body = Accepted),
        (status = 400, description = "`bad_request`: malformed JSON, a query or `Idempotency-Key` that does not parse, `timeout_secs` out of range", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such agent, or (with `dispatch_id`) the operation named a thing that does not exist; `unknown_operation`, with `dispatch_id`", body = ErrorBody),
        (status = 409, description = "`invalid_phase`: the agent is deleted; `cancelled`: the dispatch was cancelled while waited for", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the arguments do not fit in one frame", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body that is not JSON", body = ErrorBody),
        (status = 422, description = "`invalid`: a bad name, `args` not an object, an unknown field; `invalid_args`, with `dispatch_id`: the operation refused its arguments; `idempotency_key_reused`", body = ErrorBody),
        (status = 502, description = "`broker_failed`, with `dispatch_id`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
        (status = 504, description = "`timeout`, with `dispatch_id`: no answer and no progress within `timeout_secs`", body = ErrorBody),
    )
)]
pub(crate) async fn call(
    State(state): State<HubState>,
    Path((reference, name)): Path<(String, String)>,
    Query(query): Query<LifecycleQuery>,
    headers: HeaderMap,
    body: Option<ApiJson<CallBody>>,
) -> Result<Response, ApiError> {
    let (key, wait, args) = checked(&state, &query, &headers, &name, body)?;
    let agent = lookup::agent(&*state.store, &reference).await?;
    // The dispatch frame carries the agent's definition and the arguments
    // together: both must fit in one frame.
    let spec = AgentSpec {
        name: agent.name.clone(),
        command: agent.command.0.clone(),
        env: agent.env.0.clone(),
    };
    switchyard_proto::check_payload(&(&spec, &args)).map_err(|too_large| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the arguments with the agent's definition are {too_large}"),
        )
    })?;
    let entry = key.map(|key| Entry::call(agent.id, &name, &key, &args));
    let ask = Ask::call(name.clone(), args);
    let outcome = state.originator.lifecycle(&agent, ask, entry, wait).await?;
    answer(outcome, &name)
}

/// `POST /v1/brokers/{broker}/ops/{name}`: a named operation of the
/// broker's runtime itself (not of one agent), answered like a call on an
/// agent. It waits for no other work of the broker and holds none back.
#[utoipa::path(
    post, path = "/v1/brokers/{broker}/ops/{name}", operation_id = "call_broker_operation", tag = "operations",
    params(
        ("broker" = String, Path, description = "The broker's id or name", example = "edge"),
        ("name" = String, Path, description = "The operation: a lowercase letter, then lowercase letters, digits, `.`, `_` or `-`; at most 64", pattern = "^[a-z][a-z0-9._-]{0,63}$"),
        LifecycleQuery,
        IdempotencyKey,
    ),
    request_body(content = Option<CallBody>, content_type = "application/json"),
    responses(
        (status = 200, description = "The runtime answered: the finished dispatch, whose `result` is its answer", body = DispatchIntent),
        (status = 202, description = "With `?wait=false`: the dispatch written", body = Accepted),
        (status = 400, description = "`bad_request`: malformed JSON, a query or `Idempotency-Key` that does not parse, `timeout_secs` out of range", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such broker, or (with `dispatch_id`) the operation named a thing that does not exist; `unknown_operation`, with `dispatch_id`", body = ErrorBody),
        (status = 409, description = "`cancelled`: the dispatch was cancelled while waited for", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the arguments do not fit in one frame", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body that is not JSON", body = ErrorBody),
        (status = 422, description = "`invalid`: a bad name, `args` not an object, an unknown field; `invalid_args`, with `dispatch_id`: the operation refused its arguments; `idempotency_key_reused`", body = ErrorBody),
        (status = 502, description = "`broker_failed`, with `dispatch_id`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
        (status = 504, description = "`timeout`, with `dispatch_id`: no answer and no progress within `timeout_secs`", body = ErrorBody),
    )
)]
pub(crate) async fn broker_call(
    State(state): State<HubState>,
    Path((reference, name)): Path<(String, String)>,
    Query(query): Query<LifecycleQuery>,
    headers: HeaderMap,
    body: Option<ApiJson<CallBody>>,
) -> Result<Response, ApiError> {
    let (key, wait, args) = checked(&state, &query, &headers, &name, body)?;
    switchyard_proto::check_payload(&args).map_err(|too_large| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the arguments are {too_large}"),
        )
    })?;
    let broker = lookup::broker(&*state.store, &reference).await?;
    let entry = key.map(|key| Entry::broker_call(broker.id, &name, &key, &args));
    let outcome = state
        .originator
        .broker_call(broker.id, name.clone(), args, entry, wait)
        .await?;
    answer(outcome, &name)
}

/// What both kinds of call check before anything is looked up or
/// written: the Idempotency-Key, the wait, the name and the arguments.
fn checked(
    state: &HubState,
    query: &LifecycleQuery,
    headers: &HeaderMap,
    name: &str,
    body: Option<ApiJson<CallBody>>,
) -> Result<(Option<String>, Wait, Value), ApiError> {
    let key = idempotency_key(headers)?;
    let wait = query.wait(state)?;
    switchyard_proto::check_op_name(name).map_err(|err| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", err.to_string())
    })?;
    let args = object_args(body.and_then(|ApiJson(body)| body.args))?;
    Ok((key, wait, args))
}

/// Arguments of a call or a create: a JSON object, `{}` when absent;
/// anything else 422.
pub(crate) fn object_args(args: Option<Value>) -> Result<Value, ApiError> {
    match args {
        None => Ok(json!({})),
        Some(args @ Value::Object(_)) => Ok(args),
        Some(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "args must be a JSON object",
        )),
    }
}

/// Maps a call's outcome (see the module doc): the dispatch itself when
/// done, the runtime's own refusals by their code, the rest as a lifecycle
/// call's.
fn answer(outcome: Lifecycle, name: &str) -> Result<Response, ApiError> {
    match outcome {
        Lifecycle::Done { dispatch, .. } => Ok(Json(dispatch).into_response()),
        Lifecycle::Failed(dispatch) => match refusal(dispatch.error_code.as_deref()) {
            Some((status, code)) => {
                let message = dispatch
                    .error
                    .unwrap_or_else(|| format!("{name} failed on the broker"));
                Err(ApiError::new(status, code, message).with_dispatch(dispatch.id.0))
            }
            None => lifecycle_answer(Lifecycle::Failed(dispatch), name, StatusCode::OK),
        },
        other => lifecycle_answer(other, name, StatusCode::OK),
    }
}

/// The status and code of a failure the runtime gave a reason for.
fn refusal(code: Option<&str>) -> Option<(StatusCode, &'static str)> {
    match code {
        Some(UNKNOWN_OPERATION) => Some((StatusCode::NOT_FOUND, UNKNOWN_OPERATION)),
        Some(INVALID_ARGS) => Some((StatusCode::UNPROCESSABLE_ENTITY, INVALID_ARGS)),
        Some("not_found") => Some((StatusCode::NOT_FOUND, "not_found")),
        _ => None,
    }
}
