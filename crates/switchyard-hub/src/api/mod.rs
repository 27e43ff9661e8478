//! The `/v1` HTTP API (see `API.md`): one file per resource, and here what
//! every call goes through before its handler: the admin token, the
//! request's path, query and JSON body ([`extract`], which refuses NUL
//! bytes), the `Idempotency-Key` header, names. Bodies are JSON with
//! unknown fields refused, and every error is
//! `{"error": {"code", "message"}}` ([`error::ApiError`]). Handlers parse, call the originator or the store,
//! and map the outcome to a response; the route table is `http_routes`.

pub(crate) mod agents;
pub(crate) mod brokers;
pub(crate) mod dispatches;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod extract;
pub(crate) mod messages;
mod nul;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use switchyard_store::Store;

use error::ApiError;
pub(crate) use extract::ApiJson;

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
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{kind} name must be 1-64 characters of A-Z a-z 0-9 . _ - and not a UUID"),
        ))
    }
}
