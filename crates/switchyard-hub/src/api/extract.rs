//! The request extractors every handler uses instead of axum's own: the
//! same parsing, but every refusal is the API's JSON error body (axum's
//! rejections are plain text), and no string with a NUL byte gets through
//! ([`super::nul`]).
//!
//! A malformed path or query answers 400 `bad_request`; a body 400, 413,
//! 415 or 422 as [`ApiJson`] says; a NUL byte anywhere 422 `invalid`.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::nul;

/// `axum::Json` with errors in the API's error format. The body is read as
/// a JSON document first, so it can be checked for NUL bytes whatever
/// type it then becomes.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let document = match axum::Json::<Value>::from_request(req, state).await {
            Ok(axum::Json(document)) => document,
            Err(rejection) => return Err(json_error(rejection)),
        };
        nul::refuse_in_json(&document)?;
        T::deserialize(document).map(ApiJson).map_err(|err| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("Failed to deserialize the JSON body into the target type: {err}"),
            )
        })
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

/// `axum::extract::Path` with errors in the API's error format.
#[derive(Debug)]
pub(crate) struct Path<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let value = match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => value,
            Err(rejection) => return Err(path_error(rejection)),
        };
        // The segments as decoded, whatever type they became.
        if let Ok(raw) = RawPathParams::from_request_parts(parts, state).await {
            for (name, segment) in &raw {
                nul::refuse_in_text(&format!("the path's {{{name}}}"), segment)?;
            }
        }
        Ok(Path(value))
    }
}

fn path_error(rejection: PathRejection) -> ApiError {
    rejection_error(rejection.status(), rejection.body_text())
}

/// `axum::extract::Query` with errors in the API's error format.
#[derive(Debug)]
pub(crate) struct Query<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let value = match axum::extract::Query::<T>::try_from_uri(&parts.uri) {
            Ok(axum::extract::Query(value)) => value,
            Err(rejection) => return Err(query_error(rejection)),
        };
        // The pairs as decoded, whatever type they became.
        if let Ok(axum::extract::Query(pairs)) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        {
            for (name, text) in &pairs {
                nul::refuse_in_text("a query parameter name", name)?;
                nul::refuse_in_text(&format!("the query parameter {name}"), text)?;
            }
        }
        Ok(Query(value))
    }
}

fn query_error(rejection: QueryRejection) -> ApiError {
    rejection_error(rejection.status(), rejection.body_text())
}

/// A path or query axum could not parse: the client's fault (400) but for
/// a route table that does not match its handler (500).
fn rejection_error(status: StatusCode, message: String) -> ApiError {
    let code = if status.is_server_error() {
        "internal"
    } else {
        "bad_request"
    };
    ApiError::new(status, code, message)
}
