//! An in-process bench broker: one real WebSocket to one replica, the
//! signed handshake, and the cheapest possible agent behind it. Messages
//! are acked as soon as they are read (every message frame already read is
//! acked in one frame); dispatches are answered at once with a `status` and
//! a `result`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{FutureExt, SinkExt, StreamExt};
use switchyard_proto::{
    AgentStatus, BrokerCall, BrokerFrame, CONNECT_PATH, Dispatch, DispatchResult, HubFrame,
    MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, Op, Phase, auth::Handshake, decode, encode,
};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long connecting, the welcome and the closing handshake may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most frames read (and acked) in one go.
const MAX_BATCH: usize = 1024;

/// When each message id was first acked, shared by every bench broker.
#[derive(Debug, Default)]
pub(crate) struct AckBook {
    acked: Mutex<HashMap<Uuid, Instant>>,
}

impl AckBook {
    pub(super) fn record(&self, ids: &[Uuid], at: Instant) {
        let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            acked.entry(*id).or_insert(at);
        }
    }

    /// Removes from `pending` every id acked by now, returning them with
    /// their ack instants.
    pub(crate) fn take_acked(&self, pending: &mut Vec<(Uuid, Instant)>) -> Vec<(Instant, Instant)> {
        let acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = Vec::new();
        pending.retain(|(id, sent)| match acked.get(id) {
            Some(at) => {
                done.push((*sent, *at));
                false
            }
            None => true,
        });
        done
    }
}

/// Counters of what one broker saw.
#[derive(Debug, Default)]
pub(crate) struct BrokerCounts {
    pub(crate) message_frames: u64,
    pub(crate) ack_frames: u64,
    pub(crate) dispatches: u64,
}

/// A connected bench broker.
#[derive(Debug)]
pub(crate) struct BenchBroker {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<BrokerCounts>>,
}

impl BenchBroker {
    /// Connects to the replica at `addr` with the signed handshake, says
    /// hello (no agents) and waits for welcome.
    pub(crate) async fn connect(
        addr: SocketAddr,
        broker: &str,
        secret: &str,
        acks: Arc<AckBook>,
    ) -> anyhow::Result<Self> {
        let mut socket = tokio::time::timeout(STEP_TIMEOUT, upgrade(addr, broker, secret))
            .await
            .context("connecting a bench broker timed out")??;
        socket
            .send(Message::Text(
                encode(&BrokerFrame::Hello { agents: vec![] }).into(),
            ))
            .await
            .context("sending hello")?;
        let welcome = tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                match socket.next().await {
                    Some(Ok(Message::Text(text))) => return Ok(decode::<HubFrame>(&text)?),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => bail!("the hub closed instead of welcoming: {other:?}"),
                }
            }
        })
        .await
        .context("no welcome within 10 s")??;
        if !matches!(welcome, HubFrame::Welcome { .. }) {
            bail!("expected welcome, got {welcome:?}");
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(socket, acks, stop.clone()));
        Ok(Self { stop, task })
    }

    /// A broker already running as `task`, told to stop by `stop`.
    pub(super) fn spawned(
        stop: CancellationToken,
        task: JoinHandle<anyhow::Result<BrokerCounts>>,
    ) -> Self {
        Self { stop, task }
    }

    /// Stops the broker (on a socket: closes it with 1000) and waits for
    /// its task.
    pub(crate) async fn close(self) -> anyhow::Result<BrokerCounts> {
        self.stop.cancel();
        match tokio::time::timeout(STEP_TIMEOUT + Duration::from_secs(1), self.task).await {
            Ok(joined) => joined.context("bench broker task panicked")?,
            Err(_) => bail!("a bench broker did not close within 10 s"),
        }
    }
}

async fn upgrade(addr: SocketAddr, broker: &str, secret: &str) -> anyhow::Result<Socket> {
    let mut request = format!("ws://{addr}{CONNECT_PATH}").into_client_request()?;
    let headers = request.headers_mut();
    for (name, value) in Handshake::new(broker, secret).headers() {
        headers.insert(name, HeaderValue::from_str(&value)?);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .context("control channel upgrade")?;
    Ok(socket)
}

/// A status `seq` that increases per process: `max(previous + 1, now µs)`.
fn next_seq() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp_micros();
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => prev = actual,
        }
    }
}

/// The cheapest agent's answer to a dispatch: a `status` in the phase the
/// operation leads to, then a `result`; a named operation (`call`) is
/// answered with its arguments.
pub(super) fn answer_dispatch(dispatch: Dispatch) -> Vec<BrokerFrame> {
    let phase = match dispatch.op {
        Op::Start | Op::Restart => Phase::Running,
        Op::Stop => Phase::Stopped,
        Op::Create => Phase::Created,
        Op::Delete => Phase::Deleted,
        // A no-op operation: its arguments come back.
        Op::Call => {
            return vec![BrokerFrame::Result(DispatchResult {
                dispatch_id: dispatch.id,
                ok: true,
                result: Some(dispatch.args),
                error: None,
                code: None,
            })];
        }
    };
    vec![
        BrokerFrame::Status(AgentStatus {
            agent_id: dispatch.agent_id,
            phase,
            seq: next_seq(),
            exit_code: None,
            detail: None,
        }),
        BrokerFrame::Result(DispatchResult {
            dispatch_id: dispatch.id,
            ok: true,
            result: Some(serde_json::json!({ "phase": phase })),
            error: None,
            code: None,
        }),
    ]
}

/// A broker call is answered with its arguments.
pub(super) fn answer_call(call: BrokerCall) -> BrokerFrame {
    BrokerFrame::Result(DispatchResult {
        dispatch_id: call.id,
        ok: true,
        result: Some(call.args),
        error: None,
        code: None,
    })
}

async fn serve(
    mut socket: Socket,
    acks: Arc<AckBook>,
    stop: CancellationToken,
) -> anyhow::Result<BrokerCounts> {
    let mut counts = BrokerCounts::default();
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => {
                socket.close(None).await.ok();
                // Read until the hub's close answer (bounded by the caller).
                while let Some(Ok(_)) = socket.next().await {}
                return Ok(counts);
            }
            next = socket.next() => next,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match socket.next().now_or_never() {
                Some(next) => {
                    let end = next.is_none();
                    batch.push(next);
                    if end {
                        break;
                    }
                }
                None => break,
            }
        }
        let mut message_ids = Vec::new();
        let mut replies = Vec::new();
        let mut closed = None;
        for next in batch {
            match next {
                Some(Ok(Message::Text(text))) => match decode::<HubFrame>(&text)? {
                    HubFrame::Message(message) => {
                        counts.message_frames += 1;
                        message_ids.push(message.id);
                    }
                    HubFrame::Dispatch(dispatch) => {
                        counts.dispatches += 1;
                        replies.extend(answer_dispatch(dispatch));
                    }
                    HubFrame::BrokerCall(call) => {
                        counts.dispatches += 1;
                        replies.push(answer_call(call));
                    }
                    HubFrame::Error(error) => {
                        closed = Some(format!("the hub sent an error frame: {error:?}"));
                    }
                    HubFrame::Welcome { .. } => {
                        closed = Some("a second welcome on one session".to_owned());
                    }
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    closed = Some(format!("the hub closed the socket: {frame:?}"));
                }
                Some(Ok(Message::Binary(_))) => {
                    closed = Some("the hub sent a binary frame".to_owned());
                }
                Some(Err(err)) => closed = Some(format!("control channel failed: {err}")),
                None => closed = Some("the hub closed the socket".to_owned()),
            }
        }
        if !message_ids.is_empty() {
            let at = Instant::now();
            let frame = encode(&BrokerFrame::Ack {
                message_ids: message_ids.clone(),
                received: Vec::new(),
            });
            socket.feed(Message::Text(frame.into())).await?;
            acks.record(&message_ids, at);
            counts.ack_frames += 1;
        }
        for reply in &replies {
            socket.feed(Message::Text(encode(reply).into())).await?;
        }
        if !message_ids.is_empty() || !replies.is_empty() {
            socket.flush().await?;
        }
        if let Some(why) = closed {
            if stop.is_cancelled() {
                return Ok(counts);
            }
            bail!("bench broker: {why}");
        }
    }
}
