//! `/v1/agents`: definitions and lifecycle.
//!
//! A lifecycle call writes a durable dispatch intent first, wakes the
//! broker's session if it is on this replica, and then waits for the
//! outcome: subscribed to events *before* the write, with a rolling timeout
//! that every status change of the agent resets, and a re-read of the row
//! when the window ends, so a missed event never turns a success into a
//! timeout.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use switchyard_store::{
    Agent, AgentId, DispatchIntent, IntentId, IntentState, NewAgent, NewIntent, Op, Phase,
};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{ApiJson, idempotency_key, validate_name};
use crate::HubState;
use crate::api_error::ApiError;
use crate::events::HubEvent;
use crate::lookup;
use crate::routing::{route_to_holder, route_work};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateAgent {
    name: String,
    /// The broker's id or name.
    broker_id: String,
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

pub(crate) async fn create(
    State(state): State<HubState>,
    ApiJson(body): ApiJson<CreateAgent>,
) -> Result<(StatusCode, Json<Agent>), ApiError> {
    validate_name("agent", &body.name)?;
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
    let broker = lookup::broker(&*state.store, &body.broker_id).await?;
    let agent = state
        .store
        .create_agent(NewAgent {
            id: AgentId::new(),
            name: body.name,
            broker_id: broker.id,
            command: body.command,
            env: body.env,
        })
        .await?;
    // The broker prepares the agent when it next drains; nobody waits.
    let inserted = state
        .store
        .insert_intent(new_intent(&state, agent.id, Op::Create, None))
        .await?;
    state
        .metrics
        .intents_published
        .with_label_values(&[Op::Create.as_str()])
        .inc();
    route_to_holder(&state, broker.id, inserted.owner, false);
    Ok((StatusCode::CREATED, Json(agent)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    broker_id: Option<String>,
    /// Deleted agents are left out unless this is true.
    #[serde(default)]
    include_deleted: bool,
}

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

pub(crate) async fn show(
    State(state): State<HubState>,
    Path(reference): Path<String>,
) -> Result<Json<Agent>, ApiError> {
    Ok(Json(lookup::agent(&*state.store, &reference).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LifecycleQuery {
    #[serde(default = "yes")]
    wait: bool,
    /// Rolling window in seconds: how long to wait without any progress.
    timeout_secs: Option<u64>,
}

fn yes() -> bool {
    true
}

pub(crate) async fn start(
    state: State<HubState>,
    reference: Path<String>,
    query: Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    lifecycle(state, reference, query, headers, Op::Start).await
}

pub(crate) async fn stop(
    state: State<HubState>,
    reference: Path<String>,
    query: Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    lifecycle(state, reference, query, headers, Op::Stop).await
}

pub(crate) async fn restart(
    state: State<HubState>,
    reference: Path<String>,
    query: Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    lifecycle(state, reference, query, headers, Op::Restart).await
}

pub(crate) async fn remove(
    state: State<HubState>,
    reference: Path<String>,
    query: Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    lifecycle(state, reference, query, headers, Op::Delete).await
}

/// Whether `op` makes sense for an agent in `phase`.
fn check_phase(op: Op, phase: Phase) -> Result<(), ApiError> {
    use Phase::*;
    let allowed = match op {
        Op::Create => false,
        Op::Start => matches!(phase, Created | Stopped | Error),
        Op::Stop => matches!(phase, Starting | Running),
        Op::Restart => matches!(phase, Created | Starting | Running | Stopped | Error),
        Op::Delete => phase != Deleted,
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_phase",
            format!("cannot {op} an agent that is {phase}"),
        ))
    }
}

fn new_intent(state: &HubState, agent: AgentId, op: Op, key: Option<String>) -> NewIntent {
    NewIntent {
        id: IntentId::new(),
        agent_id: agent,
        op,
        args: json!({}),
        deadline: chrono::Utc::now()
            + chrono::Duration::from_std(state.config.intent_deadline)
                .unwrap_or(chrono::Duration::MAX),
        idempotency_key: key,
    }
}

async fn lifecycle(
    State(state): State<HubState>,
    Path(reference): Path<String>,
    Query(query): Query<LifecycleQuery>,
    headers: HeaderMap,
    op: Op,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let agent = lookup::agent(&*state.store, &reference).await?;
    // A retried call (same key) is answered from its original dispatch,
    // even though the agent's phase has moved on since.
    let retried = match &key {
        Some(key) => state.store.intent_by_key(key).await?,
        None => None,
    };
    if retried.is_none() {
        check_phase(op, agent.phase)?;
    }
    // Subscribe before the intent exists, so its outcome cannot slip by.
    let mut events = state.events.subscribe();
    let inserted = state
        .store
        .insert_intent(new_intent(&state, agent.id, op, key))
        .await?;
    let route = if inserted.created {
        state
            .metrics
            .intents_published
            .with_label_values(&[op.as_str()])
            .inc();
        route_to_holder(&state, agent.broker_id, inserted.owner, query.wait)
    } else {
        // A retry: its intent may still be waiting; wake whoever holds the
        // session now.
        route_work(&state, agent.broker_id, query.wait).await
    };
    let intent = inserted.row;
    if !query.wait {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "dispatch_id": intent.id, "route": route })),
        )
            .into_response());
    }
    let window = query
        .timeout_secs
        .map(Duration::from_secs)
        .unwrap_or(state.config.lifecycle_timeout);
    let intent = wait_for_outcome(&state, &mut events, intent.id, agent.id, window).await?;
    match intent.state {
        IntentState::Done => {
            let agent = if op == Op::Delete {
                state.store.mark_agent_deleted(agent.id).await?
            } else {
                state.store.agent(agent.id).await?
            };
            // The agent as API.md promises, plus the dispatch that moved it.
            let mut body = json!(agent);
            body["dispatch"] = json!(intent);
            Ok(Json(body).into_response())
        }
        IntentState::Failed => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "broker_failed",
            intent
                .error
                .unwrap_or_else(|| format!("{op} failed on the broker")),
        )
        .with_dispatch(intent.id.0)),
        IntentState::Pending | IntentState::InProgress => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "no outcome of {op} within {}s without progress; the dispatch is still {}",
                window.as_secs(),
                intent.state
            ),
        )
        .with_dispatch(intent.id.0)),
    }
}

/// Waits for the intent to finish; any status change of the agent restarts
/// the window. Returns the row as last read: finished, or still open if the
/// window ran out.
async fn wait_for_outcome(
    state: &HubState,
    events: &mut broadcast::Receiver<HubEvent>,
    intent: IntentId,
    agent: AgentId,
    window: Duration,
) -> Result<DispatchIntent, ApiError> {
    let mut deadline = Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(HubEvent::DispatchFinished(row))) if row.id == intent => return Ok(row),
            Ok(Ok(HubEvent::AgentStatus(row))) if row.id == agent => {
                deadline = Instant::now() + window;
            }
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                let row = state.store.intent(intent).await?;
                if matches!(row.state, IntentState::Done | IntentState::Failed) {
                    return Ok(row);
                }
            }
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
        }
    }
    Ok(state.store.intent(intent).await?)
}
