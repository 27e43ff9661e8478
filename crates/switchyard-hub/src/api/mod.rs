//! The `/v1` HTTP API (see `API.md`). Every route but the control channel
//! requires the admin token; bodies are JSON with unknown fields refused,
//! and every error is `{"error": {"code", "message"}}`.

mod agents;
mod brokers;
mod dispatches;
mod events;
mod messages;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde::de::DeserializeOwned;

use crate::HubState;
use crate::api_error::ApiError;
use crate::auth::require_admin;

/// Largest request body the API reads; larger ones get 413 unread.
pub(crate) const MAX_BODY_BYTES: usize = 512 * 1024;

pub(crate) fn router(state: HubState) -> Router<HubState> {
    Router::new()
        .route("/v1/brokers", post(brokers::create).get(brokers::list))
        .route(
            "/v1/brokers/{broker}",
            get(brokers::show).delete(brokers::remove),
        )
        .route("/v1/agents", post(agents::create).get(agents::list))
        .route(
            "/v1/agents/{agent}",
            get(agents::show).delete(agents::remove),
        )
        .route("/v1/agents/{agent}/start", post(agents::start))
        .route("/v1/agents/{agent}/stop", post(agents::stop))
        .route("/v1/agents/{agent}/restart", post(agents::restart))
        .route("/v1/agents/{agent}/messages", post(messages::send))
        .route("/v1/messages", post(messages::send_batch))
        .route("/v1/messages/{id}", get(messages::show))
        .route("/v1/dispatches", get(dispatches::list))
        .route("/v1/dispatches/{id}", get(dispatches::show))
        .route("/v1/cluster", get(dispatches::cluster))
        .route("/v1/events", get(events::stream))
        .route_layer(middleware::from_fn_with_state(state, require_admin))
        .route("/v1/brokers/connect", get(crate::control::connect))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn not_found() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// `axum::Json` with errors in the API's error format.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_error(rejection)),
        }
    }
}

fn json_error(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let code = match status.as_u16() {
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "invalid",
        _ => "bad_request",
    };
    ApiError::new(status, code, rejection.body_text())
}

/// The `Idempotency-Key` header, if any (1-255 printable ASCII characters).
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request("Idempotency-Key must be 1-255 printable ASCII characters")
        })?;
    Ok(Some(key.to_owned()))
}

/// Names of brokers and agents: 1-64 of `[A-Za-z0-9._-]`, not a UUID
/// (references in paths accept either, so a name must not look like an id).
pub(crate) fn validate_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && uuid::Uuid::parse_str(name).is_err();
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{kind} name must be 1-64 characters of A-Z a-z 0-9 . _ - and not a UUID"),
        ))
    }
}
