//! The only task that writes to a broker's socket, and the pinger.
//!
//! Every frame to the broker goes through one bounded channel (the
//! [`Outbox`]), so frames never interleave and a slow broker pushes back on
//! the drain instead of growing a queue.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
use switchyard_proto::{HubFrame, encode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::close::{self, Close};
use crate::affinity::{Affinity, AffinityError};

/// Frames queued for one socket before the drain has to wait.
const OUTBOUND_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// The socket's writer has stopped: the session is ending. What was
    /// claimed and not sent is requeued when the broker's next session
    /// starts.
    #[error("the session's writer is gone")]
    WriterGone,
}

/// What the writer sends.
#[derive(Debug)]
enum Outbound {
    Frame(HubFrame),
    Ping,
    /// Send a close frame with this code and reason, then stop writing.
    Close(u16, &'static str),
}

/// The way to the writer of one socket. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
}

impl Outbox {
    /// Queues a frame, waiting while the socket is behind.
    pub(crate) async fn send(&self, frame: HubFrame) -> Result<(), WriteError> {
        self.tx
            .send(Outbound::Frame(frame))
            .await
            .map_err(|_| WriteError::WriterGone)
    }

    async fn ping(&self) -> Result<(), WriteError> {
        self.tx
            .send(Outbound::Ping)
            .await
            .map_err(|_| WriteError::WriterGone)
    }

    /// Tells the broker why, closes the socket and ends the session (the
    /// session's token is cancelled). Never waits: on a full queue the
    /// explanation is dropped and the writer closes with 1001.
    pub(crate) fn close(&self, close: Close) {
        if let Some(frame) = close.frame {
            let _ = self.tx.try_send(Outbound::Frame(frame));
        }
        let _ = self.tx.try_send(Outbound::Close(close.code, close.reason));
        self.cancel.cancel();
    }
}

/// Starts the writer of `sink`; it stops after a close, when the socket
/// fails, or when `cancel` is cancelled and the queue is empty, and cancels
/// `cancel` itself on the way out.
pub(crate) fn start(
    sink: SplitSink<WebSocket, Message>,
    cancel: CancellationToken,
) -> (Outbox, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let writer = tokio::spawn(write(sink, rx, cancel.clone()));
    (Outbox { tx, cancel }, writer)
}

async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<Outbound>,
    cancel: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            next = outbound.recv() => next,
            () = cancel.cancelled() => None,
        };
        let message = match next {
            Some(Outbound::Frame(frame)) => Message::Text(encode(&frame).into()),
            Some(Outbound::Ping) => Message::Ping(Default::default()),
            Some(Outbound::Close(code, reason)) => {
                let _ = sink.send(close_message(code, reason)).await;
                break;
            }
            None => {
                let _ = sink
                    .send(close_message(close::GOING_AWAY, "hub shutting down"))
                    .await;
                break;
            }
        };
        if sink.send(message).await.is_err() {
            break;
        }
    }
    cancel.cancel();
    let _ = sink.close().await;
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Pings the broker and heartbeats the session's affinity every interval
/// until the session ends. A heartbeat that finds the session superseded
/// closes the socket.
pub(crate) async fn ping(affinity: Affinity, outbox: Outbox, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = outbox.cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if outbox.ping().await.is_err() {
            return;
        }
        match affinity.heartbeat().await {
            Ok(()) => {}
            Err(AffinityError::Superseded) => {
                tracing::info!(broker = %affinity.broker, session = %affinity.session, "session superseded; closing");
                outbox.close(Close::superseded());
                return;
            }
            Err(err) => tracing::warn!(broker = %affinity.broker, %err, "session heartbeat failed"),
        }
    }
}
