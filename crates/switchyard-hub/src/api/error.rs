//! The API's refusal type: the HTTP error body every endpoint uses,
//! `{"error": {"code": "...", "message": "..."}}` with a matching status.
//! The errors of the modules behind the API are mapped to it here, once.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use switchyard_store::{Conflict, StoreError};
use utoipa::ToSchema;

use crate::originator::OriginatorError;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The dispatch a lifecycle call created, so the caller can follow it.
    dispatch_id: Option<uuid::Uuid>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            dispatch_id: None,
        }
    }

    pub fn with_dispatch(mut self, id: uuid::Uuid) -> Self {
        self.dispatch_id = Some(id);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let (status, code) = match &err {
            // Another broker's row is as invisible to the API as a missing one.
            StoreError::NotFound(_) | StoreError::NotOwned(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            StoreError::Conflict(Conflict::KeyReused(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            StoreError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            StoreError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            _ if err.is_unavailable() => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(%err, "storage error");
        }
        Self::new(status, code, err.to_string())
    }
}

impl From<OriginatorError> for ApiError {
    fn from(err: OriginatorError) -> Self {
        match err {
            OriginatorError::InvalidPhase { .. } => {
                Self::new(StatusCode::CONFLICT, "invalid_phase", err.to_string())
            }
            OriginatorError::WriterGone => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                err.to_string(),
            ),
            OriginatorError::Store(err) => err.into(),
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong: `code` is a stable word a program can branch on
/// (`docs/api.md`, Errors), `message` is for people.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    #[schema(example = "not_found")]
    code: &'static str,
    message: String,
    /// The dispatch the call wrote, so the caller can follow it (`GET
    /// /v1/dispatches/{id}`); only where one exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    dispatch_id: Option<uuid::Uuid>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                dispatch_id: self.dispatch_id,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
