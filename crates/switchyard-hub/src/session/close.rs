//! How the hub ends a control channel: the close codes it uses (RFC 6455
//! and the private 4000 range) and the error frame that tells the broker
//! why, sent just before the close frame.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::StreamExt;
use futures::stream::SplitStream;
use switchyard_proto::{ErrorCode, ErrorFrame, HubFrame};

pub(crate) const GOING_AWAY: u16 = 1001;
pub(crate) const PROTOCOL: u16 = 1002;
pub(crate) const UNSUPPORTED_DATA: u16 = 1003;
pub(crate) const POLICY: u16 = 1008;
pub(crate) const TOO_BIG: u16 = 1009;
pub(crate) const INTERNAL: u16 = 1011;
pub(crate) const SUPERSEDED: u16 = 4000;
pub(crate) const SILENT: u16 = 4001;

/// How long the hub keeps reading after its close frame for the broker's.
const LINGER: Duration = Duration::from_secs(2);

/// Finishes the close handshake after the hub's close frame went out:
/// reads (and drops) whatever the broker still sends until its close frame
/// or end of stream, for at most [`LINGER`]. Dropping a socket with unread
/// data makes the kernel answer with a TCP reset, which can destroy the
/// close frame in flight: the broker would see 1006 instead of the code
/// that tells it why.
pub(crate) async fn linger(stream: &mut SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Why a session ends, as the broker is told.
#[derive(Debug)]
pub(crate) struct Close {
    /// Sent before the close frame, when there is something to explain.
    pub(crate) frame: Option<HubFrame>,
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

impl Close {
    /// A close frame alone.
    pub(crate) fn new(code: u16, reason: &'static str) -> Self {
        Self {
            frame: None,
            code,
            reason,
        }
    }

    /// An error frame, then the close frame.
    pub(crate) fn explained(
        error: ErrorCode,
        message: impl Into<String>,
        code: u16,
        reason: &'static str,
    ) -> Self {
        Self {
            frame: Some(error_frame(error, message)),
            code,
            reason,
        }
    }

    /// A newer session of the broker took over this one's affinity.
    pub(crate) fn superseded() -> Self {
        Self::explained(
            ErrorCode::Superseded,
            "a newer session of this broker took over",
            SUPERSEDED,
            "superseded",
        )
    }
}

pub(crate) fn error_frame(code: ErrorCode, message: impl Into<String>) -> HubFrame {
    HubFrame::Error(ErrorFrame {
        code,
        message: message.into(),
    })
}
