//! `/v1/agents/{agent}/messages` and `/v1/messages/{id}`.
//!
//! A message is committed before the 202: the answer means it is durable.
//! Writing and waking the owner are the originator's job, delivery the
//! drain's; a message becomes `delivered` only when the broker acks it.

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use switchyard_store::{AgentId, CancelOutcome, Message, MessageId, Target};

use super::error::ApiError;
use super::request::{MAX_BODY_BYTES, Path};
use super::{ApiJson, idempotency_key, validate_labels};
use crate::idempotency::Entry;
use crate::lookup;
use crate::originator::{Lifetime, Sent};
use crate::state::HubState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendMessage {
    pub(crate) body: Value,
    pub(crate) ttl_secs: Option<u64>,
    pub(crate) deliver_after: Option<DateTime<Utc>>,
}

/// The longest `ttl_secs` a message may ask for.
pub(crate) const MAX_TTL_SECS: u64 = 30 * 24 * 3600;
/// How far ahead `deliver_after` may be.
pub(crate) const MAX_DELAY_SECS: i64 = 7 * 24 * 3600;

/// A message's optional lifetime fields (`ttl_secs`, `deliver_after` of
/// a request body; not flattened, which serde cannot combine with
/// `deny_unknown_fields`).
#[derive(Debug, Default)]
pub(crate) struct When {
    /// Seconds until the message expires undelivered (1 to
    /// [`MAX_TTL_SECS`]; the server's default when absent).
    ttl_secs: Option<u64>,
    /// Not sent before this instant (RFC 3339), at most
    /// [`MAX_DELAY_SECS`] ahead and before the message expires.
    deliver_after: Option<DateTime<Utc>>,
}

impl When {
    pub(crate) fn new(ttl_secs: Option<u64>, deliver_after: Option<DateTime<Utc>>) -> Self {
        Self {
            ttl_secs,
            deliver_after,
        }
    }

    fn is_default(&self) -> bool {
        self.ttl_secs.is_none() && self.deliver_after.is_none()
    }

    /// The lifetime these fields ask for, checked; 422 when out of range.
    pub(crate) fn lifetime(&self, state: &HubState, what: &str) -> Result<Lifetime, ApiError> {
        let now = Utc::now();
        let ttl = match self.ttl_secs {
            None => state.config.message_ttl,
            Some(secs @ 1..=MAX_TTL_SECS) => std::time::Duration::from_secs(secs),
            Some(secs) => {
                return Err(invalid(format!(
                    "{what}: ttl_secs must be 1 to {MAX_TTL_SECS}, not {secs}"
                )));
            }
        };
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        if let Some(at) = self.deliver_after {
            if at > now + chrono::Duration::seconds(MAX_DELAY_SECS) {
                return Err(invalid(format!(
                    "{what}: deliver_after is at most {} days ahead",
                    MAX_DELAY_SECS / 86_400
                )));
            }
            if at >= expires_at {
                return Err(invalid(format!(
                    "{what}: deliver_after is after the message expires (ttl_secs)"
                )));
            }
        }
        Ok(Lifetime {
            expires_at,
            deliver_after: self.deliver_after,
        })
    }

    /// What the idempotency digest covers: the body alone when no lifetime
    /// was asked for (as before these fields existed), else all of it.
    pub(crate) fn digested(&self, body: &Value) -> Value {
        if self.is_default() {
            body.clone()
        } else {
            json!({ "body": body, "ttl_secs": self.ttl_secs, "deliver_after": self.deliver_after })
        }
    }
}

/// A message as JSON, or as `multipart/form-data` with files (see
/// [`super::files`]).
pub(crate) async fn send(
    State(state): State<HubState>,
    Path(reference): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    if multipart {
        let form = Multipart::from_request(request, &state)
            .await
            .map_err(|rejection| {
                ApiError::new(rejection.status(), "bad_request", rejection.body_text())
            })?;
        return super::files::send(state, reference, headers, form).await;
    }
    // The route admits bodies as large as a message's files; plain JSON
    // keeps the API's limit.
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        })?;
    let request = Request::from_parts(parts, Body::from(bytes));
    let ApiJson(request) = ApiJson::<SendMessage>::from_request(request, &state).await?;
    let key = idempotency_key(&headers)?;
    fits_in_a_frame(&request.body, "the message body")?;
    let when = When::new(request.ttl_secs, request.deliver_after);
    let lifetime = when.lifetime(&state, "the message")?;
    // An id needs no lookup: the insert checks that the agent exists and is
    // live, and the row it returns names the broker.
    let agent_id = match reference.parse::<AgentId>() {
        Ok(id) => id,
        Err(_) => lookup::agent(&*state.store, &reference).await?.id,
    };
    let entry = key.map(|key| Entry::message(agent_id, &key, &when.digested(&request.body)));
    let message = state
        .originator
        .message(agent_id, request.body, entry, lifetime);
    let sent = state.originator.send(message).await?;
    Ok((StatusCode::ACCEPTED, Json(answer(&sent))))
}

/// 413 for a body no broker would accept (see `MAX_PAYLOAD_BYTES`), before
/// anything is written: such a message would otherwise block its broker's
/// queue at every reconnect.
fn fits_in_a_frame(body: &Value, what: &str) -> Result<(), ApiError> {
    switchyard_proto::check_payload(body).map_err(|too_large| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{what} is {too_large}"),
        )
    })
}

pub(crate) fn answer(sent: &Sent) -> Value {
    let row = &sent.row;
    json!({ "id": row.id, "state": row.state, "seq": row.seq, "route": sent.route })
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
    ttl_secs: Option<u64>,
    deliver_after: Option<DateTime<Utc>>,
}

/// `POST /v1/messages`: either `messages` (explicit agents) or `to` and
/// `body` (a broadcast).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendBatch {
    messages: Option<Vec<BatchItem>>,
    to: Option<To>,
    body: Option<Value>,
    ttl_secs: Option<u64>,
    deliver_after: Option<DateTime<Utc>>,
}

/// A broadcast's target: exactly one of a broker (id or name) or labels.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct To {
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<String, String>>,
}

pub(crate) async fn send_batch(
    state: State<HubState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<SendBatch>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    match request {
        SendBatch {
            messages: Some(items),
            to: None,
            body: None,
            ttl_secs: None,
            deliver_after: None,
        } => send_items(state, headers, items).await,
        SendBatch {
            messages: None,
            to: Some(to),
            body: Some(body),
            ttl_secs,
            deliver_after,
        } => broadcast(state, headers, to, body, When::new(ttl_secs, deliver_after)).await,
        _ => Err(invalid("send either \"messages\" or \"to\" with \"body\"")),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
}

/// One message to every live agent of a broker, or every live agent whose
/// labels contain `to.labels`, resolved and written in one transaction.
/// `Idempotency-Key` covers the whole broadcast.
async fn broadcast(
    State(state): State<HubState>,
    headers: HeaderMap,
    to: To,
    body: Value,
    when: When,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = idempotency_key(&headers)?;
    fits_in_a_frame(&body, "the message body")?;
    let lifetime = when.lifetime(&state, "the broadcast")?;
    let target = match (&to.broker, &to.labels) {
        (Some(broker), None) => Target::Broker(lookup::broker(&*state.store, broker).await?.id),
        (None, Some(labels)) if !labels.is_empty() => {
            validate_labels(labels)?;
            Target::Labels(labels.clone())
        }
        _ => {
            return Err(invalid(
                "\"to\" names exactly one of \"broker\" or non-empty \"labels\"",
            ));
        }
    };
    let entry = key.map(|key| Entry::broadcast(&key, &json!(to), &when.digested(&body)));
    let (id, sent) = state
        .originator
        .broadcast(target, body, entry, lifetime)
        .await?;
    let answers: Vec<Value> = sent
        .iter()
        .map(|s| {
            let mut a = answer(s);
            a["agent_id"] = json!(s.row.agent_id);
            a
        })
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "broadcast_id": id, "messages": answers })),
    ))
}

/// Many messages, to one or many agents, in one all-or-none transaction.
/// With `Idempotency-Key: K`, item i carries the key `K/i` (unless it
/// names its own `idempotency_key`), so a retried batch returns the
/// original rows.
async fn send_items(
    State(state): State<HubState>,
    headers: HeaderMap,
    messages: Vec<BatchItem>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = idempotency_key(&headers)?;
    if messages.is_empty() || messages.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("a batch holds 1 to {MAX_BATCH} messages"),
        ));
    }
    for (i, item) in messages.iter().enumerate() {
        fits_in_a_frame(&item.body, &format!("the body of message {i}"))?;
    }
    let mut agents = std::collections::HashMap::new();
    let mut batch = Vec::with_capacity(messages.len());
    for (i, item) in messages.into_iter().enumerate() {
        let when = When::new(item.ttl_secs, item.deliver_after);
        let agent = match agents.get(&item.agent) {
            Some(agent) => *agent,
            None => {
                let row = lookup::agent(&*state.store, &item.agent).await?;
                agents.insert(item.agent.clone(), (row.id, row.broker_id));
                (row.id, row.broker_id)
            }
        };
        let entry = item
            .idempotency_key
            .or_else(|| key.as_ref().map(|k| format!("{k}/{i}")))
            .map(|key| Entry::batch_item(agent.0, &key, &when.digested(&item.body)));
        let lifetime = when.lifetime(&state, &format!("message {i}"))?;
        batch.push(
            state
                .originator
                .message(agent.0, item.body, entry, lifetime),
        );
    }
    let sent = state.originator.send_batch(batch).await?;
    let answers: Vec<Value> = sent.iter().map(answer).collect();
    Ok((StatusCode::ACCEPTED, Json(json!({ "messages": answers }))))
}

/// `DELETE /v1/messages/{id}`: withdraws a message that has not been sent
/// (`cancelled`, final; no drain on any replica sends it). Cancelling a
/// cancelled message answers the same; one already sent is a 409 naming
/// its state.
pub(crate) async fn cancel(
    State(state): State<HubState>,
    Path(id): Path<String>,
) -> Result<Json<Message>, ApiError> {
    let id: MessageId = id
        .parse()
        .map_err(|_| ApiError::bad_request("message id must be a UUID"))?;
    let (row, outcome) = state.store.cancel_message(id).await?;
    if outcome == CancelOutcome::NotPending {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_pending",
            format!(
                "the message is {}: only a pending message can be cancelled",
                row.state
            ),
        ));
    }
    Ok(Json(row))
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
