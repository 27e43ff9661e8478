//! The broker control channel (`GET /v1/brokers/connect`).
//!
//! Life of a session: the upgrade request is authenticated (signed
//! handshake); the broker's first frame is `hello` with its agents' states;
//! the hub claims the broker's affinity for a fresh session id (newest wins)
//! and closes any older local socket of the broker; it puts work that was in
//! flight on older sockets back to pending, applies the reported states,
//! answers `welcome` and starts the drain. On the way out it releases the
//! affinity by compare-and-clear, so a late teardown never marks a newer
//! session offline.
//!
//! Tasks per socket: the reader (this handler), one writer fed by a bounded
//! channel (every frame to the broker goes through it, so frames never
//! interleave and a slow broker pushes back on the drain), a pinger and the
//! drain. They share one cancellation token.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use switchyard_proto::{
    AgentStatus, BrokerFrame, DecodeError, DispatchResult, ErrorCode, ErrorFrame, HubFrame,
    MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, decode, encode,
};
use switchyard_store::{
    AgentId, Broker, Entity, IntentId, IntentOutcome, MessageId, SessionHeartbeat, SessionId,
    StoreError,
};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

use crate::HubState;
use crate::auth::authenticate_broker;
use crate::drain::Drain;
use crate::events::HubEvent;
use crate::sessions::{Outbound, SessionHandle, close_code};

/// Frames queued for one socket before the drain has to wait.
const OUTBOUND_CAPACITY: usize = 1024;
/// How long a broker has to send `hello` after the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn connect(
    State(state): State<HubState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let broker = match authenticate_broker(&*state.store, &headers).await {
        Ok(broker) => broker,
        Err(err) => return err.into_response(),
    };
    let tracker = state.sockets.clone();
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| tracker.track_future(run_session(state, broker, socket)))
}

fn error_frame(code: ErrorCode, message: impl Into<String>) -> HubFrame {
    HubFrame::Error(ErrorFrame {
        code,
        message: message.into(),
    })
}

async fn run_session(state: HubState, broker: Broker, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let agents = match read_hello(&mut stream).await {
        Ok(agents) => agents,
        Err((code, reason, message)) => {
            tracing::warn!(broker = %broker.id, %message, "control channel refused");
            let _ = sink
                .send(Message::Text(
                    encode(&error_frame(ErrorCode::Protocol, message)).into(),
                ))
                .await;
            let _ = sink.send(close(code, reason)).await;
            return;
        }
    };

    let session_id = SessionId::new();
    let cancel = state.shutdown.child_token();
    let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let handle = SessionHandle {
        session_id,
        outbound: outbound.clone(),
        wake: Arc::new(Notify::new()),
        cancel: cancel.clone(),
    };
    let writer = tokio::spawn(write_frames(sink, outbound_rx, cancel.clone()));

    let started = start_session(&state, &broker, &handle, agents).await;
    if let Err(err) = started {
        tracing::error!(broker = %broker.id, %err, "could not start session");
        handle.close(
            Some(error_frame(ErrorCode::Unavailable, err.to_string())),
            close_code::INTERNAL,
            "hub unavailable",
        );
    } else {
        tracing::info!(broker = %broker.id, session = %session_id, "broker connected");
        state.metrics.brokers_connected.inc();
        tokio::spawn(
            Drain {
                store: state.store.clone(),
                replica: state.replica_id,
                broker: broker.id,
                session: session_id,
                outbound: outbound.clone(),
                wake: handle.wake.clone(),
                backstop: state.config.drain_backstop,
                cancel: cancel.clone(),
                metrics: state.metrics.clone(),
            }
            .run(),
        );
        tokio::spawn(ping(state.clone(), broker.id, handle.clone()));
        read_frames(&state, &broker, &handle, &mut stream).await;
        state.metrics.brokers_connected.dec();
    }

    cancel.cancel();
    state.sessions.remove(broker.id, session_id);
    match state
        .store
        .release_affinity(broker.id, state.replica_id, session_id)
        .await
    {
        Ok(true) => {
            tracing::info!(broker = %broker.id, session = %session_id, "broker disconnected")
        }
        Ok(false) => tracing::info!(
            broker = %broker.id,
            session = %session_id,
            "superseded session closed; the newer session keeps the affinity"
        ),
        Err(err) => tracing::warn!(broker = %broker.id, %err, "could not release affinity"),
    }
    let _ = writer.await;
}

/// Claims affinity, replaces an older local session, requeues in-flight
/// work, applies the broker's reported states and says welcome.
async fn start_session(
    state: &HubState,
    broker: &Broker,
    handle: &SessionHandle,
    agents: Vec<AgentStatus>,
) -> Result<(), StoreError> {
    let previous = state
        .store
        .claim_affinity(broker.id, state.replica_id, handle.session_id)
        .await?;
    if let Some(old) = state.sessions.insert(broker.id, handle.clone()) {
        old.close(
            Some(error_frame(
                ErrorCode::Superseded,
                "a newer session of this broker took over",
            )),
            close_code::SUPERSEDED,
            "superseded",
        );
    }
    if let Some(previous) = previous {
        tracing::debug!(broker = %broker.id, previous = ?previous, "took over affinity");
    }
    let requeued = state.store.requeue_broker_in_flight(broker.id).await?;
    if requeued > 0 {
        tracing::info!(broker = %broker.id, requeued, "resending work in flight on older sockets");
    }
    for status in agents {
        if let Err(err) = apply_status(state, broker, status).await {
            match err {
                StoreError::NotFound(_) | StoreError::NotOwned(_) => {}
                other => return Err(other),
            }
        }
    }
    let _ = handle
        .outbound
        .send(Outbound::Frame(HubFrame::Welcome {
            session_id: handle.session_id.0,
            heartbeat_ms: state.config.heartbeat_interval.as_millis() as u64,
            max_message_bytes: MAX_MESSAGE_BYTES,
        }))
        .await;
    Ok(())
}

type Refusal = (u16, &'static str, String);

async fn read_hello(stream: &mut SplitStream<WebSocket>) -> Result<Vec<AgentStatus>, Refusal> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, stream.next())
        .await
        .map_err(|_| {
            (
                close_code::POLICY,
                "no hello",
                "no hello within 10 s".to_owned(),
            )
        })?;
    let text = match first {
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(_)) => {
            return Err((
                close_code::PROTOCOL,
                "expected hello",
                "the first frame must be a text hello frame".into(),
            ));
        }
        Some(Err(err)) => return Err((close_code::PROTOCOL, "bad frame", err.to_string())),
        None => return Err((close_code::PROTOCOL, "closed", "closed before hello".into())),
    };
    match decode::<BrokerFrame>(&text) {
        Ok(BrokerFrame::Hello { agents }) => Ok(agents),
        Ok(_) => Err((
            close_code::PROTOCOL,
            "expected hello",
            "the first frame must be hello".into(),
        )),
        Err(err) => Err((close_code::PROTOCOL, "bad hello", err.to_string())),
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// The only task that writes to the socket.
async fn write_frames(
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
                let _ = sink.send(close(code, reason)).await;
                break;
            }
            None => {
                let _ = sink
                    .send(close(close_code::GOING_AWAY, "hub shutting down"))
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

/// Pings the broker and heartbeats the session in storage every interval.
/// A heartbeat that finds the session superseded closes the socket.
async fn ping(state: HubState, broker: switchyard_store::BrokerId, handle: SessionHandle) {
    let mut ticker = tokio::time::interval(state.config.heartbeat_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = handle.cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if handle.outbound.send(Outbound::Ping).await.is_err() {
            return;
        }
        match state
            .store
            .heartbeat_session(broker, handle.session_id)
            .await
        {
            Ok(SessionHeartbeat::Current) => {}
            Ok(SessionHeartbeat::Superseded) => {
                tracing::info!(%broker, session = %handle.session_id, "session superseded; closing");
                handle.close(
                    Some(error_frame(
                        ErrorCode::Superseded,
                        "a newer session took over",
                    )),
                    close_code::SUPERSEDED,
                    "superseded",
                );
                return;
            }
            Err(err) => tracing::warn!(%broker, %err, "session heartbeat failed"),
        }
    }
}

async fn read_frames(
    state: &HubState,
    broker: &Broker,
    handle: &SessionHandle,
    stream: &mut SplitStream<WebSocket>,
) {
    let silence = state.config.heartbeat_interval * 3;
    loop {
        let next = tokio::select! {
            () = handle.cancel.cancelled() => return,
            next = tokio::time::timeout(silence, stream.next()) => next,
        };
        let message = match next {
            Err(_) => {
                tracing::warn!(broker = %broker.id, "broker silent for {silence:?}; closing");
                handle.close(None, close_code::SILENT, "silent too long");
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(err))) => {
                let err = err.into_inner();
                let (code, reason) = match err.downcast_ref::<tungstenite::Error>() {
                    Some(tungstenite::Error::Capacity(_)) => (close_code::TOO_BIG, "too big"),
                    // The broker vanished (killed, network gone): nothing to tell it.
                    Some(tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    )) => {
                        tracing::info!(broker = %broker.id, "broker went away without closing");
                        return;
                    }
                    _ => (close_code::PROTOCOL, "protocol error"),
                };
                tracing::warn!(broker = %broker.id, %err, "control channel read failed");
                handle.close(
                    Some(error_frame(
                        ErrorCode::Protocol,
                        format!("unreadable frame: {err}"),
                    )),
                    code,
                    reason,
                );
                return;
            }
            Ok(Some(Ok(message))) => message,
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return,
            Message::Binary(_) => {
                handle.close(
                    Some(error_frame(
                        ErrorCode::Protocol,
                        "binary frames are not part of the protocol",
                    )),
                    close_code::UNSUPPORTED_DATA,
                    "binary frame",
                );
                return;
            }
        };
        let frame = match decode::<BrokerFrame>(&text) {
            Ok(frame) => frame,
            Err(err) => {
                let message = match &err {
                    DecodeError::Version(_) => err.to_string(),
                    DecodeError::Malformed(e) => format!("malformed frame: {e}"),
                };
                tracing::warn!(broker = %broker.id, %message, "protocol error");
                handle.close(
                    Some(error_frame(ErrorCode::Protocol, message)),
                    close_code::PROTOCOL,
                    "protocol error",
                );
                return;
            }
        };
        if let Err(err) = handle_frame(state, broker, handle, frame).await {
            tracing::error!(broker = %broker.id, %err, "could not record a broker frame; closing");
            handle.close(
                Some(error_frame(
                    ErrorCode::Unavailable,
                    "hub storage unavailable; reconnect",
                )),
                close_code::INTERNAL,
                "hub unavailable",
            );
            return;
        }
    }
}

/// Applies one frame. Frames about another broker's agents, dispatches or
/// messages are refused with a `forbidden` error frame and change nothing;
/// a storage failure ends the session (the broker reconnects and resends).
async fn handle_frame(
    state: &HubState,
    broker: &Broker,
    handle: &SessionHandle,
    frame: BrokerFrame,
) -> Result<(), StoreError> {
    let outcome = match frame {
        BrokerFrame::Status(status) => apply_status(state, broker, status).await,
        BrokerFrame::Result(result) => apply_result(state, broker, result).await,
        BrokerFrame::Ack { message_ids } => {
            let ids: Vec<MessageId> = message_ids.into_iter().map(MessageId).collect();
            let acked = state.store.ack_messages(broker.id, &ids).await?;
            state.metrics.messages_delivered.inc_by(acked.delivered);
            if acked.not_found.is_empty() {
                Ok(())
            } else {
                Err(StoreError::NotOwned(Entity::Message))
            }
        }
        BrokerFrame::Error(error) => {
            tracing::warn!(broker = %broker.id, code = ?error.code, message = %error.message, "broker reported an error");
            Ok(())
        }
        BrokerFrame::Hello { .. } => {
            let _ = handle
                .outbound
                .send(Outbound::Frame(error_frame(
                    ErrorCode::Protocol,
                    "hello is only valid as the first frame",
                )))
                .await;
            Ok(())
        }
    };
    match outcome {
        Err(StoreError::NotFound(what) | StoreError::NotOwned(what)) => {
            tracing::warn!(broker = %broker.id, what = what.as_str(), "broker reported on something that is not its own; refused");
            let _ = handle
                .outbound
                .send(Outbound::Frame(error_frame(
                    ErrorCode::Forbidden,
                    format!("{what} not found among this broker's"),
                )))
                .await;
            Ok(())
        }
        other => other,
    }
}

async fn apply_status(
    state: &HubState,
    broker: &Broker,
    status: AgentStatus,
) -> Result<(), StoreError> {
    let (agent, applied) = state
        .store
        .apply_agent_status(
            broker.id,
            AgentId(status.agent_id),
            status.phase,
            status.seq,
        )
        .await?;
    if applied {
        state.events.publish(HubEvent::AgentStatus(agent));
    }
    Ok(())
}

async fn apply_result(
    state: &HubState,
    broker: &Broker,
    result: DispatchResult,
) -> Result<(), StoreError> {
    let id = IntentId(result.dispatch_id);
    let intent = state.store.intent(id).await?;
    if intent.broker_id != broker.id {
        return Err(StoreError::NotOwned(Entity::Intent));
    }
    let outcome = if result.ok {
        IntentOutcome::Done(result.result.unwrap_or_default())
    } else {
        IntentOutcome::Failed(
            result
                .error
                .unwrap_or_else(|| "the broker reported a failure without a reason".into()),
        )
    };
    if state.store.finish_intent(id, outcome).await? {
        let finished = state.store.intent(id).await?;
        state.metrics.observe_finished(&finished);
        state.events.publish(HubEvent::DispatchFinished(finished));
    }
    Ok(())
}
