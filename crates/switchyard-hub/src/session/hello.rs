//! The checks before a session exists: the signed handshake of the upgrade
//! request, then the broker's first frame, `hello`.
//!
//! The handshake is [`switchyard_proto::auth`]'s, with nonces recorded in
//! the database so a replay fails on any replica. Every refusal changes
//! nothing but the nonce record (invariant 8).

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use futures::stream::SplitStream;
use switchyard_proto::auth as handshake;
use switchyard_proto::{AgentStatus, BrokerFrame, ErrorCode, decode};
use switchyard_store::{Broker, Store, StoreError};

use super::close::{self, Close};
use crate::api::error::ApiError;
use crate::lookup;

/// How long a broker has to send `hello` after the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    // The upgrade request (answered 401, or 503/500 for storage).
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("handshake timestamp is not a number")]
    Timestamp,
    #[error("handshake nonce must be 16-128 printable characters")]
    Nonce,
    #[error(
        "handshake timestamp is {skew}s away from the hub's clock (allowed: {}s)",
        handshake::MAX_CLOCK_SKEW_SECS
    )]
    ClockSkew { skew: i64 },
    #[error("invalid broker credentials")]
    Credentials,
    #[error("handshake nonce was used before (replay)")]
    Replay,
    #[error(transparent)]
    Store(#[from] StoreError),

    // The first frame (answered with an error frame and a close code).
    #[error("no hello within 10 s")]
    NoHello,
    #[error("the first frame must be a text hello frame")]
    NotText,
    #[error("{0}")]
    Unreadable(String),
    #[error("closed before hello")]
    Closed,
    #[error("the first frame must be hello")]
    NotHello,
    #[error("{0}")]
    BadHello(switchyard_proto::DecodeError),
}

impl HelloError {
    /// How a refused first frame ends the socket.
    pub(crate) fn close(&self) -> Close {
        let (code, reason) = match self {
            HelloError::NoHello => (close::POLICY, "no hello"),
            HelloError::NotText | HelloError::NotHello => (close::PROTOCOL, "expected hello"),
            HelloError::Unreadable(_) => (close::PROTOCOL, "bad frame"),
            HelloError::Closed => (close::PROTOCOL, "closed"),
            HelloError::BadHello(_) => (close::PROTOCOL, "bad hello"),
            _ => (close::PROTOCOL, "protocol error"),
        };
        Close::explained(ErrorCode::Protocol, self.to_string(), code, reason)
    }
}

impl From<HelloError> for ApiError {
    fn from(err: HelloError) -> Self {
        match err {
            HelloError::Store(err) => err.into(),
            other => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", other.to_string()),
        }
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, HelloError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or(HelloError::MissingHeader(name))
}

/// Verifies a broker's upgrade request; returns the authenticated broker.
pub(crate) async fn authenticate(
    store: &dyn Store,
    headers: &HeaderMap,
) -> Result<Broker, HelloError> {
    let broker_ref = header(headers, handshake::HEADER_BROKER)?;
    let timestamp: i64 = header(headers, handshake::HEADER_TIMESTAMP)?
        .parse()
        .map_err(|_| HelloError::Timestamp)?;
    let nonce = header(headers, handshake::HEADER_NONCE)?;
    let signature = header(headers, handshake::HEADER_SIGNATURE)?;
    if !handshake::nonce_is_valid(nonce) {
        return Err(HelloError::Nonce);
    }
    // Checked: a hostile timestamp (i64::MIN) must not overflow the subtraction.
    let skew = chrono::Utc::now()
        .timestamp()
        .checked_sub(timestamp)
        .and_then(i64::checked_abs)
        .unwrap_or(i64::MAX);
    if skew > handshake::MAX_CLOCK_SKEW_SECS {
        return Err(HelloError::ClockSkew { skew });
    }
    let broker = match lookup::broker(store, broker_ref).await {
        Ok(broker) => broker,
        Err(StoreError::NotFound(_)) => return Err(HelloError::Credentials),
        Err(err) => return Err(err.into()),
    };
    if !handshake::verify(&broker.secret_hash, broker_ref, timestamp, nonce, signature) {
        tracing::warn!(broker = %broker.id, "broker handshake with a wrong signature");
        return Err(HelloError::Credentials);
    }
    let keep = Duration::from_secs(2 * handshake::MAX_CLOCK_SKEW_SECS as u64);
    if !store.record_nonce(broker.id, nonce, keep).await? {
        tracing::warn!(broker = %broker.id, "replayed broker handshake refused");
        return Err(HelloError::Replay);
    }
    Ok(broker)
}

/// Reads the first frame, which must be `hello`; returns the agent states
/// it reports.
pub(crate) async fn read(
    stream: &mut SplitStream<WebSocket>,
) -> Result<Vec<AgentStatus>, HelloError> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, stream.next())
        .await
        .map_err(|_| HelloError::NoHello)?;
    let text = match first {
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(_)) => return Err(HelloError::NotText),
        Some(Err(err)) => return Err(HelloError::Unreadable(err.to_string())),
        None => return Err(HelloError::Closed),
    };
    match decode::<BrokerFrame>(&text) {
        Ok(BrokerFrame::Hello { agents }) => Ok(agents),
        Ok(_) => Err(HelloError::NotHello),
        Err(err) => Err(HelloError::BadHello(err)),
    }
}
