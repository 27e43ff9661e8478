//! What every `/v1` request passes before its handler, in the order it
//! happens: the admin token ([`require_admin`]), then the request's path,
//! query and JSON body, read by this module's extractors instead of axum's
//! ([`Path`], [`Query`], [`ApiJson`]: the same parsing, but every refusal is
//! the API's JSON error body, and no string with a NUL byte gets through),
//! then the `Idempotency-Key` header and names.
//!
//! NUL bytes (U+0000) are refused at the edge because PostgreSQL cannot
//! store them in `TEXT` or `JSONB` (it would answer 500 after the request
//! was accepted) and a program cannot receive them in an argument or an
//! environment variable (SQLite would store the agent and its spawn would
//! fail later): every JSON string and key, path segment and query value is
//! checked before a handler runs, and answers 422 `invalid` with nothing
//! written. A malformed path or query answers 400 `bad_request`; a body
//! 400, 413, 415 or 422 as [`ApiJson`] says.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{
    FromRequest, FromRequestParts, OptionalFromRequest, RawPathParams, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use switchyard_store::Store;

use super::error::ApiError;

/// Largest request body the API reads; larger ones get 413 unread.
pub(crate) const MAX_BODY_BYTES: usize = 512 * 1024;

/// The stored form of an admin token.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random secret (admin token or broker secret): 256 bits, hex.
pub fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Admin tokens: `Authorization: Bearer <token>`, checked against token
/// digests stored in the database, so a token works on every replica that
/// shares it.
///
/// Digests verified lately are remembered, so a busy client does not cost a
/// database round trip per request. Only successes are kept, for
/// [`TOKEN_CACHE_TTL`]: an unknown token is always checked, and a token
/// removed from storage stops working within the TTL.
#[derive(Clone, Debug)]
pub(crate) struct AdminTokens {
    store: Arc<dyn Store>,
    verified: Arc<Mutex<HashMap<String, Instant>>>,
}

/// How long a verified token is trusted without asking storage again.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(30);

impl AdminTokens {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            verified: Arc::default(),
        }
    }

    fn is_fresh(&self, digest: &str) -> bool {
        let verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        verified
            .get(digest)
            .is_some_and(|at| at.elapsed() < TOKEN_CACHE_TTL)
    }

    fn remember(&self, digest: String) {
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded: expired entries go whenever a new one is added.
        verified.retain(|_, at| at.elapsed() < TOKEN_CACHE_TTL);
        verified.insert(digest, Instant::now());
    }
}

/// Middleware for the `/v1` API: refuses requests without a valid token.
pub(crate) async fn require_admin(
    State(tokens): State<AdminTokens>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token: send Authorization: Bearer <admin token>",
        ));
    };
    let digest = token_digest(token);
    if !tokens.is_fresh(&digest) {
        if !tokens.store.admin_token_exists(&digest).await? {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid admin token",
            ));
        }
        tokens.remember(digest);
    }
    Ok(next.run(request).await)
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

/// Names of brokers and agents: 1-64 of `[A-Za-z0-9._-]`, not `.` or `..`,
/// not a UUID (references in paths accept either, so a name must not look
/// like an id).
pub(crate) fn validate_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && uuid::Uuid::parse_str(name).is_err()
        // A path segment `.` or `..` is rewritten by URL normalization in
        // most HTTP clients: such a name could never be addressed.
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!(
                "{kind} name must be 1-64 characters of A-Z a-z 0-9 . _ -, not `.` or `..`, \
                 and not a UUID"
            ),
        ))
    }
}

/// Most labels on one agent.
pub(crate) const MAX_LABELS: usize = 32;

/// Checks an agent's labels (or a broadcast's selector): at most
/// [`MAX_LABELS`] pairs; a key is 1-63 characters, a lowercase letter or
/// digit then lowercase letters, digits, `.`, `_`, `/` or `-`; a value is
/// 0-63 of `A-Z a-z 0-9 . _ -`. Plain words, so a selector can be written
/// `k=v,k2=v2` on a command line and matched on either backend.
pub(crate) fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let invalid =
        |message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message);
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!("at most {MAX_LABELS} labels")));
    }
    for (key, value) in labels {
        let key_ok = key.len() <= 63
            && key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-')
            });
        if !key_ok {
            return Err(invalid(format!(
                "label key {key:?}: 1-63 of a-z 0-9 . _ / -, starting with a letter or digit"
            )));
        }
        let value_ok = value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !value_ok {
            return Err(invalid(format!(
                "label {key:?} value {value:?}: 0-63 of A-Z a-z 0-9 . _ -"
            )));
        }
    }
    Ok(())
}

/// `axum::Json` with errors in the API's error format. The body is read as
/// a JSON document first, so it can be checked for NUL bytes whatever
/// type it then becomes.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let document = match <axum::Json<Value> as FromRequest<S>>::from_request(req, state).await {
            Ok(axum::Json(document)) => document,
            Err(rejection) => return Err(json_error(rejection)),
        };
        refuse_in_json(&document)?;
        T::deserialize(document).map(ApiJson).map_err(|err| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("Failed to deserialize the JSON body into the target type: {err}"),
            )
        })
    }
}

/// An optional body: a request without a `Content-Type` has none; one with
/// a body is read as [`ApiJson`].
impl<T: DeserializeOwned, S: Send + Sync> OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        if req.headers().get(header::CONTENT_TYPE).is_none() {
            return Ok(None);
        }
        <Self as FromRequest<S>>::from_request(req, state)
            .await
            .map(Some)
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
                refuse_in_text(&format!("the path's {{{name}}}"), segment)?;
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
                refuse_in_text("a query parameter name", name)?;
                refuse_in_text(&format!("the query parameter {name}"), text)?;
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

/// Refuses `text` if it holds a NUL byte; `what` names it for the client.
pub(crate) fn refuse_in_text(what: &str, text: &str) -> Result<(), ApiError> {
    if text.contains('\0') {
        Err(refusal(what))
    } else {
        Ok(())
    }
}

/// Refuses a JSON document with a NUL byte in any string or object key, at
/// any depth; the message says where (`$.body.items[2]`).
pub(crate) fn refuse_in_json(value: &Value) -> Result<(), ApiError> {
    match path_to_nul(value) {
        Some(path) => Err(refusal(&format!("the JSON body at ${path}"))),
        None => Ok(()),
    }
}

fn refusal(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        format!("{what} contains a NUL byte (U+0000), which cannot be stored"),
    )
}

/// The JSON path of the first string or key holding a NUL byte, relative
/// to `value`. Built on the way out, so a clean document costs no
/// allocation.
fn path_to_nul(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => text.contains('\0').then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| path_to_nul(item).map(|rest| format!("[{i}]{rest}"))),
        Value::Object(fields) => fields.iter().find_map(|(key, field)| {
            if key.contains('\0') {
                return Some(format!("[{key:?}]"));
            }
            path_to_nul(field).map(|rest| format!(".{key}{rest}"))
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::path_to_nul;

    #[test]
    fn nul_is_found_in_nested_strings_and_keys_and_nowhere_else() {
        assert_eq!(
            path_to_nul(&json!({"a": [1, "ok", {"b": "x\u{0}"}]})).as_deref(),
            Some(".a[2].b")
        );
        assert_eq!(
            path_to_nul(&json!({"a": {"k\u{0}": 1}})).as_deref(),
            Some(".a[\"k\\0\"]")
        );
        assert_eq!(path_to_nul(&json!("\u{0}")).as_deref(), Some(""));
        assert_eq!(
            path_to_nul(&json!({"a": ["\\u0000", null, true, 1.5]})),
            None
        );
    }
}
