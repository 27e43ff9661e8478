//! Who may call the hub.
//!
//! Admin API: `Authorization: Bearer <token>`, checked against token
//! digests stored in the database, so a token works on every replica that
//! shares it. Brokers: the signed handshake of [`switchyard_proto::auth`],
//! with nonces recorded in the database so a replay fails on any replica.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use switchyard_proto::auth as handshake;
use switchyard_store::{Broker, Store, StoreError};

use crate::HubState;
use crate::api_error::ApiError;
use crate::lookup;

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

/// Middleware for the `/v1` API: refuses requests without a valid token.
pub(crate) async fn require_admin(
    State(state): State<HubState>,
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
    if !state.tokens.is_fresh(&digest) {
        if !state.store.admin_token_exists(&digest).await? {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid admin token",
            ));
        }
        state.tokens.remember(digest);
    }
    Ok(next.run(request).await)
}

/// Admin token digests this replica verified against storage lately, so a
/// busy client does not cost a database round trip per request. Only
/// successes are kept, for [`TOKEN_CACHE_TTL`]: an unknown token is always
/// checked, and a token removed from storage stops working within the TTL.
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    verified: Mutex<HashMap<String, Instant>>,
}

/// How long a verified token is trusted without asking storage again.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(30);

impl TokenCache {
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

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized(format!("missing {name} header")))
}

/// Verifies a broker's upgrade request; returns the authenticated broker.
/// Every failure is a 401 and changes nothing but the nonce record.
pub(crate) async fn authenticate_broker(
    store: &dyn Store,
    headers: &HeaderMap,
) -> Result<Broker, ApiError> {
    let broker_ref = header(headers, handshake::HEADER_BROKER)?;
    let timestamp: i64 = header(headers, handshake::HEADER_TIMESTAMP)?
        .parse()
        .map_err(|_| unauthorized("handshake timestamp is not a number"))?;
    let nonce = header(headers, handshake::HEADER_NONCE)?;
    let signature = header(headers, handshake::HEADER_SIGNATURE)?;
    if !handshake::nonce_is_valid(nonce) {
        return Err(unauthorized(
            "handshake nonce must be 16-128 printable characters",
        ));
    }
    let skew = (chrono::Utc::now().timestamp() - timestamp).abs();
    if skew > handshake::MAX_CLOCK_SKEW_SECS {
        return Err(unauthorized(format!(
            "handshake timestamp is {skew}s away from the hub's clock (allowed: {}s)",
            handshake::MAX_CLOCK_SKEW_SECS
        )));
    }
    let broker = match lookup::broker(store, broker_ref).await {
        Ok(broker) => broker,
        Err(StoreError::NotFound(_)) => return Err(unauthorized("invalid broker credentials")),
        Err(err) => return Err(err.into()),
    };
    if !handshake::verify(&broker.secret_hash, broker_ref, timestamp, nonce, signature) {
        tracing::warn!(broker = %broker.id, "broker handshake with a wrong signature");
        return Err(unauthorized("invalid broker credentials"));
    }
    let keep = Duration::from_secs(2 * handshake::MAX_CLOCK_SKEW_SECS as u64);
    if !store.record_nonce(broker.id, nonce, keep).await? {
        tracing::warn!(broker = %broker.id, "replayed broker handshake refused");
        return Err(unauthorized("handshake nonce was used before (replay)"));
    }
    Ok(broker)
}
