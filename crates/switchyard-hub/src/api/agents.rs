//! `/v1/agents`: definitions and lifecycle.
//!
//! A lifecycle call is the originator's (write the intent, wake the owner,
//! wait for the outcome); this file maps its answer: 200 with the agent and
//! its dispatch, 202 when not waiting, 502 when the broker failed, 504 when
//! the window passed without progress.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use switchyard_proto::AgentSpec;
use switchyard_store::{Agent, AgentId, DispatchIntent, IntentId, NewAgent, Op, Phase};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::openapi::IdempotencyKey;
use super::request::{Path, Query};
use super::{ApiJson, idempotency_key, validate_labels, validate_name};
use crate::idempotency::Entry;
use crate::lookup;
use crate::originator::{Ask, Lifecycle, Route, Wait};
use crate::state::HubState;

/// The body of `POST /v1/agents`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateAgent {
    /// 1-64 of `A-Z a-z 0-9 . _ -`, not `.` or `..`, not a UUID.
    #[schema(example = "worker-1")]
    name: String,
    /// The broker's id or name.
    #[schema(example = "edge")]
    broker_id: String,
    /// The program and its arguments; the first item names the program.
    #[schema(example = json!(["sh", "-c", "cat > /dev/null"]))]
    command: Vec<String>,
    /// Environment variables of the agent (names without `=`).
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// `key=value` pairs a broadcast can select the agent by: at most 32;
    /// a key is 1-63 of `a-z 0-9 . _ / -` starting with a letter or digit,
    /// a value 0-63 of `A-Z a-z 0-9 . _ -`.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Arguments of the broker's create (a JSON object; `{}` if absent).
    #[schema(value_type = Option<Object>)]
    args: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct CreateQuery {
    /// Wait for the broker's create and answer with its result. Off by
    /// default: an agent may be defined before its broker ever connects.
    #[serde(default)]
    wait: bool,
    /// With `wait=true`: how long to wait without progress, 1 to 3,600
    /// seconds (default 60).
    #[param(minimum = 1, maximum = 3600)]
    timeout_secs: Option<u64>,
}

/// The answer to a lifecycle call that finished: the agent, with its new
/// phase, and the dispatch that moved it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AgentWithDispatch {
    #[serde(flatten)]
    #[schema(value_type = Agent)]
    agent: Option<Agent>,
    /// Absent only in the answer to `POST /v1/agents` without `?wait=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    dispatch: Option<DispatchIntent>,
}

/// The answer to a call made with `?wait=false`: the dispatch written,
/// and how it reaches the broker.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Accepted {
    dispatch_id: IntentId,
    route: Route,
}

/// `POST /v1/agents`: defines the agent and writes its create dispatch.
/// With `?wait=true` the call waits for the broker's create like a
/// lifecycle call (201 with the agent and its finished `dispatch`, whose
/// `result` is what the runtime answered; 502 or 504 with the dispatch id,
/// the agent staying defined).
#[utoipa::path(
    post, path = "/v1/agents", operation_id = "create_agent", tag = "agents",
    params(CreateQuery),
    request_body = CreateAgent,
    responses(
        (status = 201, description = "Defined; with `?wait=true` also the finished create `dispatch`", body = AgentWithDispatch),
        (status = 400, description = "`bad_request`: malformed JSON, a bad query", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such broker", body = ErrorBody),
        (status = 409, description = "`conflict`: a live agent has that name; `cancelled`: the create was cancelled while waited for", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not JSON", body = ErrorBody),
        (status = 422, description = "`invalid`", body = ErrorBody),
        (status = 502, description = "`broker_failed` (with `?wait=true`): the agent stays defined", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
        (status = 504, description = "`timeout` (with `?wait=true`): the agent stays defined", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<HubState>,
    Query(query): Query<CreateQuery>,
    ApiJson(body): ApiJson<CreateAgent>,
) -> Result<Response, ApiError> {
    let wait = LifecycleQuery {
        wait: query.wait,
        timeout_secs: query.timeout_secs,
    }
    .wait(&state)?;
    validate_name("agent", &body.name)?;
    let args = super::ops::object_args(body.args)?;
    if body.command.is_empty() || body.command[0].is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "command must name a program",
        ));
    }
    if let Some(key) = body
        .env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("invalid environment variable name {key:?}"),
        ));
    }
    validate_labels(&body.labels)?;
    // Every dispatch of the agent carries its definition in one frame.
    let spec = AgentSpec {
        name: body.name.clone(),
        command: body.command.clone(),
        env: body.env.clone(),
    };
    switchyard_proto::check_payload(&spec).map_err(|too_large| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the agent definition (name, command, env) is {too_large}"),
        )
    })?;
    switchyard_proto::check_payload(&(&spec, &args)).map_err(|too_large| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the create's arguments with the agent's definition are {too_large}"),
        )
    })?;
    let broker = lookup::broker(&*state.store, &body.broker_id).await?;
    let agent = state
        .store
        .create_agent(NewAgent {
            id: AgentId::new(),
            name: body.name,
            broker_id: broker.id,
            command: body.command,
            env: body.env,
            labels: body.labels,
        })
        .await?;
    let Wait::For(_) = wait else {
        // The broker prepares the agent when it next drains; nobody waits.
        state
            .originator
            .dispatch(agent.id, Ask::create(args))
            .await?;
        let created = AgentWithDispatch {
            agent: Some(agent),
            dispatch: None,
        };
        return Ok((StatusCode::CREATED, Json(created)).into_response());
    };
    let outcome = state
        .originator
        .lifecycle(&agent, Ask::create(args), None, wait)
        .await?;
    answer(outcome, Op::Create, StatusCode::CREATED)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this broker's agents (id or name).
    broker_id: Option<String>,
    /// Deleted agents are left out unless this is true.
    #[serde(default)]
    include_deleted: bool,
}

#[utoipa::path(
    get, path = "/v1/agents", operation_id = "list_agents", tag = "agents",
    params(ListQuery),
    responses(
        (status = 200, description = "The agents, deleted ones only if asked for", body = Vec<Agent>),
        (status = 400, description = "`bad_request`: a query that does not parse", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such broker", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the query", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(state): State<HubState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<Agent>>, ApiError> {
    let broker = match query.broker_id {
        Some(reference) => Some(lookup::broker(&*state.store, &reference).await?.id),
        None => None,
    };
    let mut agents = state.store.list_agents(broker).await?;
    if !query.include_deleted {
        agents.retain(|a| a.phase != Phase::Deleted);
    }
    Ok(Json(agents))
}

#[utoipa::path(
    get, path = "/v1/agents/{agent}", operation_id = "show_agent", tag = "agents",
    params(("agent" = String, Path, description = "The agent's id or name", example = "worker")),
    responses(
        (status = 200, description = "The agent (by id also a deleted one)", body = Agent),
        (status = 400, description = "`bad_request`: a path that does not parse", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the path", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<HubState>,
    Path(reference): Path<String>,
) -> Result<Json<Agent>, ApiError> {
    Ok(Json(lookup::agent(&*state.store, &reference).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct LifecycleQuery {
    /// Wait for the outcome (default); `false` answers 202 at once.
    #[serde(default = "yes")]
    #[param(default = true)]
    wait: bool,
    /// Rolling window in seconds: how long to wait without any progress,
    /// 1 to 3,600 (default 60).
    #[param(minimum = 1, maximum = 3600)]
    timeout_secs: Option<u64>,
}

/// The longest rolling window a lifecycle call may ask for. Bounded so a
/// caller cannot hold a request (and overflow the clock arithmetic of the
/// wait) with an absurd value.
pub(crate) const MAX_TIMEOUT_SECS: u64 = 3600;

fn yes() -> bool {
    true
}

impl LifecycleQuery {
    /// How the caller wants to wait; a window out of range is a 400.
    pub(crate) fn wait(&self, state: &HubState) -> Result<Wait, ApiError> {
        let window = match self.timeout_secs {
            Some(secs @ 1..=MAX_TIMEOUT_SECS) => Duration::from_secs(secs),
            Some(secs) => {
                return Err(ApiError::bad_request(format!(
                    "timeout_secs must be 1 to {MAX_TIMEOUT_SECS}, not {secs}"
                )));
            }
            None => state.config.lifecycle_timeout,
        };
        Ok(if self.wait {
            Wait::For(window)
        } else {
            Wait::No
        })
    }
}

/// The answers of every lifecycle call (start, stop, restart, delete),
/// described once for the document.
pub(crate) struct LifecycleAnswers;

impl utoipa::IntoResponses for LifecycleAnswers {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        let json = |description: &str, schema: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(schema)))
                            .build(),
                    )
                    .build(),
            )
        };
        [
            ("200", "The broker reported success: the agent with its new phase, and the finished dispatch", "AgentWithDispatch"),
            ("202", "With `?wait=false`: the dispatch written", "Accepted"),
            ("400", "`bad_request`: a query or `Idempotency-Key` that does not parse, `timeout_secs` out of range", "ErrorBody"),
            ("401", "`unauthorized`", "ErrorBody"),
            ("404", "`not_found`", "ErrorBody"),
            ("409", "`invalid_phase`: the op makes no sense in the agent's phase, or the agent is being deleted; nothing is written. `cancelled`: the dispatch was cancelled while waited for", "ErrorBody"),
            ("422", "`invalid`: a NUL byte; `idempotency_key_reused`", "ErrorBody"),
            ("502", "`broker_failed`, with `dispatch_id`", "ErrorBody"),
            ("503", "`unavailable`", "ErrorBody"),
            ("504", "`timeout`, with `dispatch_id`: no outcome and no progress within `timeout_secs`", "ErrorBody"),
        ]
        .into_iter()
        .map(|(status, description, schema)| (status.to_owned(), json(description, schema)))
        .collect()
    }
}

#[utoipa::path(
    post, path = "/v1/agents/{agent}/start", operation_id = "start_agent", tag = "agents",
    params(
        ("agent" = String, Path, description = "The agent's id or name", example = "worker"),
        LifecycleQuery,
        IdempotencyKey,
    ),
    responses(LifecycleAnswers)
)]
pub(crate) async fn start(
    state: State<HubState>,
    reference: Path<String>,
    query: Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    lifecycle(state, reference, query, headers, Op::Start).await
}

#[utoipa::path(
    post, path = "/v1/agents/{agent}/stop", operation_id = "stop_agent", tag = "agents",
    params(
        ("agent" = String, Path, description = "The agent's id or name", example = "worker"),
        LifecycleQuery,
        IdempotencyKey,
    ),
    responses(LifecycleAnswers)
)]
pub(crate) async fn stop(
    state: State<HubState>,
    reference: Path<String>,
    query: Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    lifecycle(state, reference, query, headers, Op::Stop).await
}

#[utoipa::path(
    post, path = "/v1/agents/{agent}/restart", operation_id = "restart_agent", tag = "agents",
    params(
        ("agent" = String, Path, description = "The agent's id or name", example = "worker"),
        LifecycleQuery,
        IdempotencyKey,
    ),
    responses(LifecycleAnswers)
)]
pub(crate) async fn restart(
    state: State<HubState>,
    reference: Path<String>,
    query: Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    lifecycle(state, reference, query, headers, Op::Restart).await
}

#[utoipa::path(
    delete, path = "/v1/agents/{agent}", operation_id = "delete_agent", tag = "agents",
    params(
        ("agent" = String, Path, description = "The agent's id or name", example = "worker"),
        LifecycleQuery,
        IdempotencyKey,
    ),
    responses(LifecycleAnswers)
)]
pub(crate) async fn remove(
    state: State<HubState>,
    reference: Path<String>,
    query: Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    lifecycle(state, reference, query, headers, Op::Delete).await
}

async fn lifecycle(
    State(state): State<HubState>,
    Path(reference): Path<String>,
    Query(query): Query<LifecycleQuery>,
    headers: HeaderMap,
    op: Op,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    // Checked before anything is looked up or written.
    let wait = query.wait(&state)?;
    let agent = lookup::agent(&*state.store, &reference).await?;
    let entry = key.map(|key| Entry::lifecycle(agent.id, op, &key));
    let outcome = state
        .originator
        .lifecycle(&agent, Ask::lifecycle(op), entry, wait)
        .await?;
    answer(outcome, op, StatusCode::OK)
}

/// The answer to a lifecycle call: `done` (200, or 201 for a create) with
/// the agent and the dispatch that moved it, 202 when not waiting, 502
/// when the broker failed, 409 when the dispatch was cancelled, 504 when
/// the window passed without progress.
pub(crate) fn answer(
    outcome: Lifecycle,
    op: impl std::fmt::Display,
    done: StatusCode,
) -> Result<Response, ApiError> {
    match outcome {
        Lifecycle::Accepted { dispatch, route } => Ok((
            StatusCode::ACCEPTED,
            Json(Accepted {
                dispatch_id: dispatch,
                route,
            }),
        )
            .into_response()),
        Lifecycle::Done { agent, dispatch } => {
            let body = AgentWithDispatch {
                agent,
                dispatch: Some(dispatch),
            };
            Ok((done, Json(body)).into_response())
        }
        Lifecycle::Failed(dispatch) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "broker_failed",
            dispatch
                .error
                .unwrap_or_else(|| format!("{op} failed on the broker")),
        )
        .with_dispatch(dispatch.id.0)),
        Lifecycle::Cancelled(dispatch) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "cancelled",
            "the dispatch was cancelled before it was sent",
        )
        .with_dispatch(dispatch.id.0)),
        Lifecycle::TimedOut { dispatch, window } => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "no outcome of {op} within {}s without progress; the dispatch is still {}",
                window.as_secs(),
                dispatch.state
            ),
        )
        .with_dispatch(dispatch.id.0)),
    }
}
