//! The only task that writes to a broker's socket, and the pinger.
//!
//! Every frame to the broker goes through one channel (the [`Outbox`]),
//! bounded in frames and in bytes, so frames never interleave and a slow
//! broker pushes back on the drain instead of growing a queue. The writer
//! writes what is queued and flushes once per batch. Every batch has a
//! timeout: a broker that stops reading is disconnected instead of holding
//! the session (and a graceful shutdown) forever.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::SinkExt;
use futures::stream::SplitSink;
use switchyard_proto::{HubFrame, encode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::close::{self, Close};
use crate::affinity::{Affinity, AffinityError};

/// Frames queued for one socket before the drain has to wait.
const OUTBOUND_CAPACITY: usize = 1024;
/// Bytes of encoded frames queued for one socket before the drain has to
/// wait: what a broker that stops reading can cost this replica.
const OUTBOUND_BYTES: usize = 4 << 20;
/// Bytes written before a flush when more frames are queued.
const BATCH_BYTES: usize = 256 << 10;

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
    /// An encoded frame, holding its share of [`OUTBOUND_BYTES`] until written.
    Frame(String, OwnedSemaphorePermit),
    Ping,
    /// Send a close frame with this code and reason, then stop writing.
    Close(u16, &'static str),
}

/// The way to the writer of one socket. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Outbound>,
    bytes: Arc<Semaphore>,
    cancel: CancellationToken,
}

impl Outbox {
    /// Queues a frame, waiting while the socket is behind.
    pub(crate) async fn send(&self, frame: HubFrame) -> Result<(), WriteError> {
        let text = encode(&frame);
        let share = share(&text);
        // Trying first keeps the common case (room in the budget) free of
        // an await, which would spend the drain's cooperative budget.
        let permit = match self.bytes.clone().try_acquire_many_owned(share) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => self
                .bytes
                .clone()
                .acquire_many_owned(share)
                .await
                .map_err(|_| WriteError::WriterGone)?,
            Err(TryAcquireError::Closed) => return Err(WriteError::WriterGone),
        };
        self.tx
            .send(Outbound::Frame(text, permit))
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
            let text = encode(&frame);
            if let Ok(permit) = self.bytes.clone().try_acquire_many_owned(share(&text)) {
                let _ = self.tx.try_send(Outbound::Frame(text, permit));
            }
        }
        let _ = self.tx.try_send(Outbound::Close(close.code, close.reason));
        self.cancel.cancel();
    }
}

/// The permits a frame holds: its size, capped so that one oversized frame
/// still fits in the budget alone.
fn share(text: &str) -> u32 {
    u32::try_from(text.len().min(OUTBOUND_BYTES)).unwrap_or(u32::MAX)
}

/// Starts the writer of `sink`; it stops after a close, when the socket
/// fails or a write takes longer than `write_timeout`, or when `cancel` is
/// cancelled and the queue is empty, and cancels `cancel` itself on the way
/// out.
pub(crate) fn start(
    sink: SplitSink<WebSocket, Message>,
    cancel: CancellationToken,
    write_timeout: Duration,
) -> (Outbox, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let writer = tokio::spawn(write(sink, rx, cancel.clone(), write_timeout));
    let bytes = Arc::new(Semaphore::new(OUTBOUND_BYTES));
    (Outbox { tx, bytes, cancel }, writer)
}

async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<Outbound>,
    cancel: CancellationToken,
    write_timeout: Duration,
) {
    let mut closing = None;
    while closing.is_none() {
        let next = tokio::select! {
            biased;
            next = outbound.recv() => next,
            () = cancel.cancelled() => None,
        };
        let first = match next {
            Some(Outbound::Close(code, reason)) => {
                closing = Some(close_message(code, reason));
                break;
            }
            None => {
                closing = Some(close_message(close::GOING_AWAY, "hub shutting down"));
                break;
            }
            Some(first) => first,
        };
        let batch = write_batch(&mut sink, &mut outbound, first, &mut closing);
        match tokio::time::timeout(write_timeout, batch).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::warn!(
                    timeout_secs = write_timeout.as_secs_f64(),
                    "the broker stopped reading; disconnecting it"
                );
                closing = None;
                break;
            }
        }
    }
    cancel.cancel();
    if let Some(goodbye) = closing {
        let _ = tokio::time::timeout(write_timeout, sink.send(goodbye)).await;
    }
    let _ = tokio::time::timeout(write_timeout, sink.close()).await;
}

/// Writes `first` and whatever else is already queued (up to
/// [`BATCH_BYTES`]), then flushes once: one flush, one timeout and usually
/// one system call per batch rather than per frame. A close found in the
/// queue ends the batch and is left in `closing` for the caller. The frames'
/// permits are released once the batch is flushed.
async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    outbound: &mut mpsc::Receiver<Outbound>,
    first: Outbound,
    closing: &mut Option<Message>,
) -> Result<(), axum::Error> {
    let mut permits = Vec::new();
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(item) = next.take() {
        match item {
            Outbound::Frame(text, permit) => {
                bytes += text.len();
                sink.feed(Message::Text(text.into())).await?;
                permits.push(permit);
            }
            Outbound::Ping => sink.feed(Message::Ping(Default::default())).await?,
            Outbound::Close(code, reason) => {
                *closing = Some(close_message(code, reason));
                break;
            }
        }
        if bytes < BATCH_BYTES {
            next = outbound.try_recv().ok();
        }
    }
    sink.flush().await
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
