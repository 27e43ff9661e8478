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
use switchyard_store::{
    AgentId, AttachmentId, BroadcastId, CancelOutcome, Message, MessageId, MessageState, Target,
};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::openapi::IdempotencyKey;
use super::request::{MAX_BODY_BYTES, Path};
use super::{ApiJson, idempotency_key, validate_labels};
use crate::idempotency::Entry;
use crate::lookup;
use crate::originator::{Lifetime, Route, Sent};
use crate::state::HubState;

/// A message to one agent (the JSON body, or the `message` part of a
/// form with files).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendMessage {
    /// Any JSON; at most 252 KiB as compact JSON.
    #[schema(value_type = Value, example = json!({"task": "summarize"}))]
    pub(crate) body: Value,
    /// Seconds it may wait for delivery, 1 to 2,592,000 (default: the
    /// server's `--message-ttl-secs`).
    #[schema(minimum = 1, maximum = 2_592_000)]
    pub(crate) ttl_secs: Option<u64>,
    /// Not sent before this instant: at most 7 days ahead, before it
    /// expires.
    pub(crate) deliver_after: Option<DateTime<Utc>>,
}

/// `POST /v1/agents/{agent}/messages` as `multipart/form-data`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // describes the form only; `super::files` reads it
pub(crate) struct MessageForm {
    /// The message, as a plain send's JSON body.
    message: SendMessage,
    /// One part per file (at most 16, adding up to 64 MiB by default),
    /// named by its `filename`.
    #[schema(value_type = Vec<String>, format = Binary)]
    file: Vec<Vec<u8>>,
}

/// A message accepted: durable, with its place in the agent's FIFO.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageAccepted {
    id: MessageId,
    state: MessageState,
    /// Its place in the agent's FIFO.
    seq: i64,
    /// How it was routed; `null` for a repeated `Idempotency-Key`
    /// (nothing new was routed).
    route: Option<Route>,
    /// In a broadcast's answer: whose copy this is.
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: Option<AgentId>,
    /// For a message with files: the files stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    attachments: Option<Vec<StoredFile>>,
}

/// A file stored with a message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StoredFile {
    pub(crate) id: AttachmentId,
    /// As stored, made safe (see `docs/api.md`, Messages with files).
    pub(crate) name: String,
    pub(crate) size: u64,
    /// Lowercase hex SHA-256 of its bytes.
    pub(crate) sha256: String,
}

/// The answer to `POST /v1/messages`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchAccepted {
    /// For a broadcast: its id.
    #[serde(skip_serializing_if = "Option::is_none")]
    broadcast_id: Option<BroadcastId>,
    /// In request order; for a broadcast, one per agent reached.
    messages: Vec<MessageAccepted>,
}

impl MessageAccepted {
    /// The same answer with the files stored with the message.
    pub(crate) fn with_files(mut self, files: Vec<StoredFile>) -> Self {
        self.attachments = Some(files);
        self
    }
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
#[utoipa::path(
    post, path = "/v1/agents/{agent}/messages", operation_id = "send_message", tag = "messages",
    params(
        ("agent" = String, Path, description = "The agent's id or name", example = "worker"),
        IdempotencyKey,
    ),
    request_body(content(
        (SendMessage = "application/json"),
        (MessageForm = "multipart/form-data"),
    )),
    responses(
        (status = 202, description = "Durable; `attachments` for a message with files", body = MessageAccepted),
        (status = 400, description = "`bad_request`: malformed JSON or form, a bad `Idempotency-Key`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such live agent", body = ErrorBody),
        (status = 408, description = "`request_timeout`: the form did not arrive within 10 minutes; nothing is written", body = ErrorBody),
        (status = 409, description = "`conflict`: the agent is deleted", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: neither JSON nor a form", body = ErrorBody),
        (status = 422, description = "`invalid`; `idempotency_key_reused`", body = ErrorBody),
        (status = 503, description = "`unavailable`: also when the replica receives 16 messages with files already", body = ErrorBody),
    )
)]
pub(crate) async fn send(
    State(state): State<HubState>,
    Path(reference): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<(StatusCode, Json<MessageAccepted>), ApiError> {
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

pub(crate) fn answer(sent: &Sent) -> MessageAccepted {
    let row = &sent.row;
    MessageAccepted {
        id: row.id,
        state: row.state,
        seq: row.seq,
        route: sent.route,
        agent_id: None,
        attachments: None,
    }
}

/// Most messages in one `POST /v1/messages`.
const MAX_BATCH: usize = 1000;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchItem {
    /// The agent's id or name.
    agent: String,
    #[schema(value_type = Value)]
    body: Value,
    /// This item's own idempotency key (overrides the derived `K/i`).
    idempotency_key: Option<String>,
    #[schema(minimum = 1, maximum = 2_592_000)]
    ttl_secs: Option<u64>,
    deliver_after: Option<DateTime<Utc>>,
}

/// `POST /v1/messages`: either `messages` (explicit agents, 1 to 1,000)
/// or `to` and `body` (a broadcast, which may carry `ttl_secs` and
/// `deliver_after`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendBatch {
    #[schema(min_items = 1, max_items = 1000)]
    messages: Option<Vec<BatchItem>>,
    to: Option<To>,
    #[schema(value_type = Option<Value>)]
    body: Option<Value>,
    #[schema(minimum = 1, maximum = 2_592_000)]
    ttl_secs: Option<u64>,
    deliver_after: Option<DateTime<Utc>>,
}

/// A broadcast's target: exactly one of a broker (id or name) or labels.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct To {
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<String, String>>,
}

#[utoipa::path(
    post, path = "/v1/messages", operation_id = "send_messages", tag = "messages",
    params(IdempotencyKey),
    request_body = SendBatch,
    responses(
        (status = 202, description = "All durable, in request order (a broadcast: one per agent reached, by agent id)", body = BatchAccepted),
        (status = 400, description = "`bad_request`: malformed JSON, a bad `Idempotency-Key`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: an unknown or deleted agent or broker; nothing is written", body = ErrorBody),
        (status = 409, description = "`conflict`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not JSON", body = ErrorBody),
        (status = 422, description = "`invalid`; `idempotency_key_reused`; nothing is written", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn send_batch(
    state: State<HubState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<SendBatch>,
) -> Result<(StatusCode, Json<BatchAccepted>), ApiError> {
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
) -> Result<(StatusCode, Json<BatchAccepted>), ApiError> {
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
    let messages = sent
        .iter()
        .map(|s| MessageAccepted {
            agent_id: Some(s.row.agent_id),
            ..answer(s)
        })
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchAccepted {
            broadcast_id: Some(id),
            messages,
        }),
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
) -> Result<(StatusCode, Json<BatchAccepted>), ApiError> {
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
    let messages = sent.iter().map(answer).collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchAccepted {
            broadcast_id: None,
            messages,
        }),
    ))
}

/// `DELETE /v1/messages/{id}`: withdraws a message that has not been sent
/// (`cancelled`, final; no drain on any replica sends it). Cancelling a
/// cancelled message answers the same; one already sent is a 409 naming
/// its state.
#[utoipa::path(
    delete, path = "/v1/messages/{id}", operation_id = "cancel_message", tag = "messages",
    params(("id" = String, Path, description = "The message's id (a UUID)")),
    responses(
        (status = 200, description = "The message, `cancelled` (also when it was before)", body = Message),
        (status = 400, description = "`bad_request`: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`not_pending`: already sent or finished; nothing changes", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the path", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
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

#[utoipa::path(
    get, path = "/v1/messages/{id}", operation_id = "show_message", tag = "messages",
    params(("id" = String, Path, description = "The message's id (a UUID)")),
    responses(
        (status = 200, description = "The message", body = Message),
        (status = 400, description = "`bad_request`: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`invalid`: a NUL byte in the path", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<HubState>,
    Path(id): Path<String>,
) -> Result<Json<Message>, ApiError> {
    let id: MessageId = id
        .parse()
        .map_err(|_| ApiError::bad_request("message id must be a UUID"))?;
    Ok(Json(state.store.message(id).await?))
}
