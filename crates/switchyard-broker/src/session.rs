//! One live control-channel session: `hello` -> `welcome`, then frames.
//!
//! Shape: one writer task owns the socket's sink and is fed by a bounded
//! channel; the reader loop (this task) reads hub frames, queues work on the
//! [`Executor`] and forwards status changes; an ack task batches message
//! acks. The reader never stops reading while the session lives, which is
//! also what flushes tungstenite's automatic pong replies.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use switchyard_proto::{
    BrokerFrame, DispatchResult, ErrorCode, ErrorFrame, HubFrame, decode, encode,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::executor::{BROKER_WORKER, Executor, Job, Replies};
use crate::files::HubClient;
use crate::reports::StatusFeed;
use crate::runtime::Runtime;

pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames waiting for the writer before senders block.
const OUTGOING_QUEUE: usize = 1024;
/// How long the hub may take to answer `hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an ack may wait for more acks to share its frame.
const ACK_LINGER: Duration = Duration::from_millis(2);
/// Most ids in one ack frame (keeps it far below the message size limit).
const MAX_ACK_IDS: usize = 1000;
/// How long a clean close may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("websocket: {0}")]
    Socket(#[from] tungstenite::Error),
    #[error("no welcome from the hub within {WELCOME_TIMEOUT:?}")]
    NoWelcome,
    #[error("the hub ended the session: {0:?} {1}")]
    Refused(ErrorCode, String),
    #[error("a newer session of this broker took over: {0}")]
    Superseded(String),
    #[error("unexpected frame before welcome: {0}")]
    Unexpected(String),
    #[error("nothing received for {0:?}; the connection is presumed dead")]
    Silent(Duration),
    #[error("the hub closed the connection{0}")]
    Closed(String),
    #[error("the socket writer stopped")]
    WriterGone,
    #[error("http: {0}")]
    Http(String),
    #[error("the hub answered {0}: {1}")]
    Status(u16, String),
    #[error("the hub refused the broker credentials (401)")]
    Unauthorized,
    #[error("a message could not be handed over; the next session gets it again")]
    HandOver,
}

/// How a session ended without error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// `shutdown` was cancelled; the socket was closed with 1000.
    Shutdown,
    /// A poll session reached the time to try the WebSocket again; if the
    /// upgrade is refused, this session is polled on.
    Rotate(crate::poll::Kept),
}

/// Runs one session on an upgraded socket until it ends.
pub(crate) async fn run(
    mut socket: Socket,
    files: Arc<HubClient>,
    runtime: &Arc<dyn Runtime>,
    executor: &mut Executor,
    shutdown: &CancellationToken,
) -> Result<Ended, SessionError> {
    let mut status_feed = StatusFeed::subscribe(runtime);
    let hello = BrokerFrame::Hello {
        agents: runtime.statuses(),
    };
    socket.send(Message::text(encode(&hello))).await?;
    let (session_id, heartbeat_ms) = tokio::select! {
        () = shutdown.cancelled() => {
            close(&mut socket).await;
            return Ok(Ended::Shutdown);
        }
        welcome = tokio::time::timeout(WELCOME_TIMEOUT, welcome(&mut socket)) => {
            welcome.map_err(|_| SessionError::NoWelcome)??
        }
    };
    tracing::info!(%session_id, heartbeat_ms, "session is live");

    let (sink, stream) = socket.split();
    let (out, out_rx) = mpsc::channel(OUTGOING_QUEUE);
    let mut writer = tokio::spawn(write(sink, out_rx));
    let (acks, acks_rx) = mpsc::unbounded_channel();
    let acker = tokio::spawn(batch_acks(acks_rx, out.clone()));
    let (results, results_rx) = mpsc::unbounded_channel();
    let replies = Replies::new(results, acks, files);
    let failed = replies.failed.clone();

    let reading = Reader {
        stream,
        out: &out,
        replies,
        results: results_rx,
        executor,
        status_feed: &mut status_feed,
        silence: (heartbeat_ms > 0).then(|| Duration::from_millis(heartbeat_ms.saturating_mul(3))),
    };
    let ended = tokio::select! {
        ended = reading.run(shutdown) => ended,
        _ = &mut writer => Err(SessionError::WriterGone),
        () = failed.cancelled() => Err(SessionError::HandOver),
    };
    if ended.as_ref().is_ok_and(|e| *e == Ended::Shutdown) {
        let _ = out.send(Outgoing::Close).await;
        drop(out);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut writer).await;
    }
    writer.abort();
    acker.abort();
    ended
}

async fn welcome(socket: &mut Socket) -> Result<(Uuid, u64), SessionError> {
    loop {
        let Some(message) = socket.next().await else {
            return Err(SessionError::Closed(" before welcome".to_owned()));
        };
        match message? {
            Message::Text(text) => {
                return match decode::<HubFrame>(&text) {
                    Ok(HubFrame::Welcome {
                        session_id,
                        heartbeat_ms,
                        ..
                    }) => Ok((session_id, heartbeat_ms)),
                    Ok(HubFrame::Error(ErrorFrame {
                        code: ErrorCode::Superseded,
                        message,
                    })) => Err(SessionError::Superseded(message)),
                    Ok(HubFrame::Error(ErrorFrame { code, message })) => {
                        Err(SessionError::Refused(code, message))
                    }
                    Ok(other) => Err(SessionError::Unexpected(format!("{other:?}"))),
                    Err(err) => Err(SessionError::Unexpected(err.to_string())),
                };
            }
            Message::Close(frame) => return Err(SessionError::Closed(describe_close(frame))),
            _ => {}
        }
    }
}

struct Reader<'a> {
    stream: SplitStream<Socket>,
    out: &'a mpsc::Sender<Outgoing>,
    /// Kept so `results` never ends while the session lives.
    replies: Replies,
    results: mpsc::UnboundedReceiver<DispatchResult>,
    executor: &'a mut Executor,
    status_feed: &'a mut StatusFeed,
    silence: Option<Duration>,
}

impl Reader<'_> {
    async fn run(mut self, shutdown: &CancellationToken) -> Result<Ended, SessionError> {
        let mut last_heard = Instant::now();
        loop {
            let deadline = self.silence.map(|s| last_heard + s);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(Ended::Shutdown),
                () = sleep_until(deadline) => {
                    return Err(SessionError::Silent(self.silence.unwrap_or_default()));
                }
                statuses = self.status_feed.next() => {
                    for frame in statuses {
                        self.send(frame).await?;
                    }
                }
                Some(result) = self.results.recv() => {
                    // Statuses the op caused were broadcast before it
                    // returned: they are in the feed now, and go first.
                    for frame in self.status_feed.pending() {
                        self.send(frame).await?;
                    }
                    self.send(BrokerFrame::Result(result)).await?;
                }
                message = self.stream.next() => {
                    last_heard = Instant::now();
                    match message {
                        None => return Err(SessionError::Closed(String::new())),
                        Some(message) => self.handle(message?).await?,
                    }
                }
            }
        }
    }

    async fn handle(&mut self, message: Message) -> Result<(), SessionError> {
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => return Err(SessionError::Closed(describe_close(frame))),
            Message::Binary(_) => {
                tracing::warn!("ignoring a binary frame from the hub");
                return self
                    .protocol_error("binary frames are not part of the protocol")
                    .await;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        match decode::<HubFrame>(&text) {
            Ok(HubFrame::Dispatch(dispatch)) => {
                let agent_id = dispatch.agent_id;
                self.executor
                    .submit(agent_id, Job::Dispatch(dispatch), self.replies.clone())
                    .await;
            }
            Ok(HubFrame::BrokerCall(call)) => {
                self.executor
                    .submit(BROKER_WORKER, Job::BrokerCall(call), self.replies.clone())
                    .await;
            }
            Ok(HubFrame::Message(message)) => {
                let agent_id = message.agent_id;
                self.executor
                    .submit(agent_id, Job::Message(message), self.replies.clone())
                    .await;
            }
            Ok(HubFrame::Welcome { .. }) => tracing::warn!("ignoring a second welcome"),
            Ok(HubFrame::Error(ErrorFrame { code, message })) => match code {
                ErrorCode::Superseded => return Err(SessionError::Superseded(message)),
                ErrorCode::Unavailable | ErrorCode::ShuttingDown => {
                    return Err(SessionError::Refused(code, message));
                }
                ErrorCode::Protocol | ErrorCode::Forbidden => {
                    tracing::warn!(?code, "the hub refused a frame: {message}");
                }
            },
            Err(err) => {
                tracing::warn!("unreadable frame from the hub: {err}");
                return self.protocol_error(&err.to_string()).await;
            }
        }
        Ok(())
    }

    async fn protocol_error(&self, message: &str) -> Result<(), SessionError> {
        self.send(BrokerFrame::Error(ErrorFrame {
            code: ErrorCode::Protocol,
            message: message.to_owned(),
        }))
        .await
    }

    async fn send(&self, frame: BrokerFrame) -> Result<(), SessionError> {
        self.out
            .send(Outgoing::Frame(frame))
            .await
            .map_err(|_| SessionError::WriterGone)
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What the writer task is asked to do.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Frame(BrokerFrame),
    /// Send a normal (1000) close and stop.
    Close,
}

async fn write(
    mut sink: SplitSink<Socket, Message>,
    mut queue: mpsc::Receiver<Outgoing>,
) -> Result<(), tungstenite::Error> {
    while let Some(outgoing) = queue.recv().await {
        match outgoing {
            Outgoing::Frame(frame) => {
                sink.feed(Message::text(encode(&frame))).await?;
                if queue.is_empty() {
                    sink.flush().await?;
                }
            }
            Outgoing::Close => {
                sink.send(Message::Close(Some(normal_close()))).await?;
                break;
            }
        }
    }
    sink.close().await
}

/// Forwards acks in batches: everything handled while more work was
/// immediately at hand, waiting at most [`ACK_LINGER`] past the first id.
async fn batch_acks(mut acks: mpsc::UnboundedReceiver<Uuid>, out: mpsc::Sender<Outgoing>) {
    while let Some(first) = acks.recv().await {
        let mut message_ids = vec![first];
        let deadline = Instant::now() + ACK_LINGER;
        while message_ids.len() < MAX_ACK_IDS {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some(id)) => message_ids.push(id),
                Ok(None) | Err(_) => break,
            }
        }
        if out
            .send(Outgoing::Frame(BrokerFrame::Ack {
                message_ids,
                received: Vec::new(),
            }))
            .await
            .is_err()
        {
            return;
        }
    }
}

fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "broker shutting down".into(),
    }
}

/// Closes a socket that is not split yet, cleanly and briefly.
pub(crate) async fn close(socket: &mut Socket) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(Some(normal_close()))).await;
}

fn describe_close(frame: Option<CloseFrame>) -> String {
    match frame {
        Some(frame) => format!(" ({} {})", u16::from(frame.code), frame.reason),
        None => String::new(),
    }
}
