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
use switchyard_store::{Message, MessageId, NewMessage};

use super::{ApiJson, idempotency_key};
use crate::HubState;
use crate::api_error::ApiError;
use crate::lookup;
use crate::routing::route_work;

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
    let agent = lookup::agent(&*state.store, &reference).await?;
    let expires_at = chrono::Utc::now()
        + chrono::Duration::from_std(state.config.message_ttl).unwrap_or(chrono::Duration::MAX);
    let inserted = state
        .store
        .insert_messages(vec![NewMessage {
            id: MessageId::new(),
            agent_id: agent.id,
            body: request.body,
            expires_at,
            idempotency_key: key,
        }])
        .await?
        .remove(0);
    let route = if inserted.created {
        state.metrics.messages_accepted.inc();
        Some(route_work(&state, agent.broker_id).await)
    } else {
        None
    };
    let row = inserted.row;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": row.id, "state": row.state, "seq": row.seq, "route": route })),
    ))
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
