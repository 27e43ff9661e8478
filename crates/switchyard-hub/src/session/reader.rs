//! Reading a broker's frames until the session ends.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::StreamExt;
use futures::stream::SplitStream;
use switchyard_proto::{BrokerFrame, DecodeError, ErrorCode, decode};
use switchyard_store::Broker;
use tokio_tungstenite::tungstenite;

use super::SessionHandle;
use super::apply::{ApplyError, apply};
use super::close::{self, Close};
use super::writer::Outbox;
use crate::state::HubState;

/// Why reading stopped before the broker closed the socket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("broker silent for {0:?}")]
    Silent(Duration),
    #[error("unreadable frame: {0}")]
    TooBig(String),
    #[error("unreadable frame: {0}")]
    Unreadable(String),
    #[error("binary frames are not part of the protocol")]
    Binary,
    #[error("{}", decode_message(.0))]
    Decode(DecodeError),
    #[error("could not record a broker frame: {0}")]
    Apply(ApplyError),
}

fn decode_message(err: &DecodeError) -> String {
    match err {
        DecodeError::Version(_) => err.to_string(),
        DecodeError::Malformed(e) => format!("malformed frame: {e}"),
    }
}

impl ReadError {
    /// How the session ends: what the broker is told.
    pub(crate) fn close(&self) -> Close {
        match self {
            ReadError::Silent(_) => Close::new(close::SILENT, "silent too long"),
            ReadError::TooBig(_) => Close::explained(
                ErrorCode::Protocol,
                self.to_string(),
                close::TOO_BIG,
                "too big",
            ),
            ReadError::Unreadable(_) | ReadError::Decode(_) => Close::explained(
                ErrorCode::Protocol,
                self.to_string(),
                close::PROTOCOL,
                "protocol error",
            ),
            ReadError::Binary => Close::explained(
                ErrorCode::Protocol,
                self.to_string(),
                close::UNSUPPORTED_DATA,
                "binary frame",
            ),
            ReadError::Apply(_) => Close::explained(
                ErrorCode::Unavailable,
                "hub storage unavailable; reconnect",
                close::INTERNAL,
                "hub unavailable",
            ),
        }
    }
}

/// Reads and applies frames until the broker closes, goes silent for three
/// heartbeat intervals, sends something unreadable, or the session is
/// cancelled. `Ok` when there is nothing to tell the broker.
pub(crate) async fn run(
    state: &HubState,
    broker: &Broker,
    handle: &SessionHandle,
    outbox: &Outbox,
    stream: &mut SplitStream<WebSocket>,
) -> Result<(), ReadError> {
    let silence = state.config.heartbeat_interval * 3;
    loop {
        let next = tokio::select! {
            () = handle.cancel.cancelled() => return Ok(()),
            next = tokio::time::timeout(silence, stream.next()) => next,
        };
        let message = match next {
            Err(_) => return Err(ReadError::Silent(silence)),
            Ok(None) => return Ok(()),
            Ok(Some(Err(err))) => {
                let err = err.into_inner();
                return match err.downcast_ref::<tungstenite::Error>() {
                    Some(tungstenite::Error::Capacity(_)) => {
                        Err(ReadError::TooBig(err.to_string()))
                    }
                    // The broker vanished (killed, network gone): nothing to tell it.
                    Some(tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    )) => {
                        tracing::info!(broker = %broker.id, "broker went away without closing");
                        Ok(())
                    }
                    _ => Err(ReadError::Unreadable(err.to_string())),
                };
            }
            Ok(Some(Ok(message))) => message,
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return Ok(()),
            Message::Binary(_) => return Err(ReadError::Binary),
        };
        let frame = decode::<BrokerFrame>(&text).map_err(ReadError::Decode)?;
        let answer = apply(state, broker, frame)
            .await
            .map_err(ReadError::Apply)?;
        if let Some(answer) = answer {
            let _ = outbox.send(answer).await;
        }
    }
}
