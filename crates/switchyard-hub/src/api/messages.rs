//! `/v1/agents/{agent}/messages` and `/v1/messages/{id}`.
//!
//! A message is committed before the 202: the answer means it is durable.
//! Delivery is the drain's job; a message becomes `delivered` only when the
//! broker acks it.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_store::{AgentId, Message, MessageId, NewMessage};

use super::{ApiJson, idempotency_key};
use crate::HubState;
use crate::api_error::ApiError;
use crate::lookup;
use crate::routing::route_to_holder;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendMessage {
    body: Value,
}

pub(crate) async fn send(
    State(state): State<HubState>,
    Path(reference): Path<String>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<SendMessage>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = idempotency_key(&headers)?;
    // An id needs no lookup: the insert checks that the agent exists and is
    // live, and the row it returns names the broker.
    let agent_id = match reference.parse::<AgentId>() {
        Ok(id) => id,
        Err(_) => lookup::agent(&*state.store, &reference).await?.id,
    };
    let inserted = state
        .messages
        .write(NewMessage {
            id: MessageId::new(),
            agent_id,
            body: request.body,
            expires_at: expires_at(&state),
            idempotency_key: key,
        })
        .await?;
    let route = if inserted.created {
        state.metrics.messages_accepted.inc();
        Some(route_to_holder(
            &state,
            inserted.row.broker_id,
            inserted.owner,
            false,
        ))
    } else {
        None
    };
    let row = inserted.row;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": row.id, "state": row.state, "seq": row.seq, "route": route })),
    ))
}

fn expires_at(state: &HubState) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
        + chrono::Duration::from_std(state.config.message_ttl).unwrap_or(chrono::Duration::MAX)
}

/// Most messages in one `POST /v1/messages`.
const MAX_BATCH: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchItem {
    /// The agent's id or name.
    agent: String,
    body: Value,
    /// This item's own idempotency key (overrides the derived `K/i`).
    idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendBatch {
    messages: Vec<BatchItem>,
}

/// `POST /v1/messages`: many messages, to one or many agents, in one
/// all-or-none transaction. With `Idempotency-Key: K`, item i carries the
/// key `K/i` (unless it names its own `idempotency_key`), so a retried
/// batch returns the original rows.
pub(crate) async fn send_batch(
    State(state): State<HubState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<SendBatch>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = idempotency_key(&headers)?;
    if request.messages.is_empty() || request.messages.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("a batch holds 1 to {MAX_BATCH} messages"),
        ));
    }
    let mut agents = std::collections::HashMap::new();
    let expires_at = expires_at(&state);
    let mut batch = Vec::with_capacity(request.messages.len());
    for (i, item) in request.messages.into_iter().enumerate() {
        let agent = match agents.get(&item.agent) {
            Some(agent) => *agent,
            None => {
                let row = lookup::agent(&*state.store, &item.agent).await?;
                agents.insert(item.agent.clone(), (row.id, row.broker_id));
                (row.id, row.broker_id)
            }
        };
        batch.push(NewMessage {
            id: MessageId::new(),
            agent_id: agent.0,
            body: item.body,
            expires_at,
            idempotency_key: item
                .idempotency_key
                .or_else(|| key.as_ref().map(|k| format!("{k}/{i}"))),
        });
    }
    let rows = state.store.insert_messages(batch).await?;
    let created = rows.iter().filter(|r| r.created).count();
    state.metrics.messages_accepted.inc_by(created as u64);
    let holders: std::collections::BTreeMap<_, _> = rows
        .iter()
        .filter(|r| r.created)
        .map(|r| (r.row.broker_id, r.owner))
        .collect();
    let routes: std::collections::HashMap<_, _> = holders
        .into_iter()
        .map(|(broker, holder)| (broker, route_to_holder(&state, broker, holder, false)))
        .collect();
    let answers: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.row.id,
                "state": r.row.state,
                "seq": r.row.seq,
                "route": routes.get(&r.row.broker_id),
            })
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(json!({ "messages": answers }))))
}

pub(crate) async fn show(
    State(state): State<HubState>,
    Path(id): Path<String>,
) -> Result<Json<Message>, ApiError> {
    let id: MessageId = id
        .parse()
        .map_err(|_| ApiError::bad_request("message id must be a UUID"))?;
    Ok(Json(state.store.message(id).await?))
}
