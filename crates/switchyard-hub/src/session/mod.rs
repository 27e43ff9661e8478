//! The broker control channel (`GET /v1/brokers/connect`): one session per
//! socket.
//!
//! Life of a session: the upgrade request is authenticated (signed
//! handshake, [`hello`]); the broker's first frame is `hello` with its
//! agents' states; the hub claims the broker's [`Affinity`] for a fresh
//! session id (newest wins) and closes any older local socket of the broker
//! ([`Registry`]); it puts work that was in flight on older sockets back to
//! pending, applies the reported states, answers `welcome` and starts the
//! [`drain`]. Then the [`reader`] applies frames until the session ends; on
//! the way out the affinity is released by compare-and-clear.
//!
//! Tasks per socket: the reader (this handler), the [`writer`] (every frame
//! to the broker goes through it), the pinger and the drain. They share one
//! cancellation token.

mod apply;
mod close;
mod drain;
pub(crate) mod files;
mod hello;
pub(crate) mod poll;
mod reader;
mod writer;

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use switchyard_proto::{AgentStatus, ErrorCode, HubFrame, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES};
use switchyard_store::{Broker, SessionId, StoreError, Transport};
use tokio::sync::Notify;

use crate::affinity::{Affinity, AffinityError};
use crate::api::error::{ApiError, ErrorBody};
use crate::events;
use crate::state::HubState;
use apply::ApplyError;
use close::Close;
use drain::Drain;
pub(crate) use drain::{Registry, SessionHandle};

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Affinity(#[from] AffinityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// The upgrade: authenticated before the socket exists. A request that is
/// no WebSocket upgrade is refused first, in the API's JSON error format.
#[utoipa::path(
    get, path = "/v1/brokers/connect", operation_id = "connect_broker", tag = "control channel",
    security(("broker_id" = [], "broker_timestamp" = [], "broker_nonce" = [], "broker_signature" = [])),
    responses(
        (status = 101, description = "Switching to the WebSocket control channel (docs/protocol.md)"),
        (status = 400, description = "`bad_request`: not a WebSocket upgrade", body = ErrorBody),
        (status = 401, description = "`unauthorized`: a missing or malformed handshake header, a timestamp off by more than 300 s, wrong credentials, a replayed nonce", body = ErrorBody),
        (status = 503, description = "`unavailable`: the replica holds its maximum of sessions (try another), or the database is unreachable", body = ErrorBody),
    )
)]
pub(crate) async fn connect(
    State(state): State<HubState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            let status = rejection.status();
            let code = if status == StatusCode::METHOD_NOT_ALLOWED {
                "method_not_allowed"
            } else {
                "bad_request"
            };
            return ApiError::new(status, code, rejection.body_text()).into_response();
        }
    };
    // Checked before anything that reads the database: at the cap,
    // nothing else is worth doing.
    let Ok(permit) = state.session_permits.clone().try_acquire_owned() else {
        return ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "this replica holds its maximum of {} broker sessions; try another replica",
                state.config.max_sessions
            ),
        )
        .into_response();
    };
    let broker = match hello::authenticate(&*state.store, &headers).await {
        Ok(broker) => broker,
        Err(err) => return ApiError::from(err).into_response(),
    };
    let tracker = state.sockets.clone();
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                run(state, broker, socket).await;
                drop(permit);
            })
        })
}

async fn run(state: HubState, broker: Broker, socket: WebSocket) {
    let (sink, mut stream) = socket.split();
    let cancel = state.shutdown.child_token();
    let (outbox, writer) = writer::start(sink, cancel.clone(), state.config.write_timeout);
    let agents = match hello::read(&mut stream).await {
        Ok(agents) => agents,
        Err(err) => {
            tracing::warn!(broker = %broker.id, %err, "control channel refused");
            outbox.close(err.close());
            let _ = writer.await;
            close::linger(&mut stream).await;
            return;
        }
    };

    let handle = SessionHandle {
        session_id: SessionId::new(),
        outbox: Some(outbox.clone()),
        wake: Arc::new(Notify::new()),
        cancel: cancel.clone(),
    };
    let affinity = Affinity::new(
        state.store.clone(),
        state.replica_id,
        broker.id,
        handle.session_id,
        Transport::Ws,
    );
    let started = start(&state, &broker, &affinity, agents).await;
    state.registry.insert(broker.id, handle.clone());
    if let Err(err) = started {
        tracing::error!(broker = %broker.id, %err, "could not start session");
        outbox.close(Close::explained(
            ErrorCode::Unavailable,
            err.to_string(),
            close::INTERNAL,
            "hub unavailable",
        ));
    } else {
        let _ = outbox
            .send(HubFrame::Welcome {
                session_id: handle.session_id.0,
                heartbeat_ms: millis(state.config.heartbeat_interval),
                max_message_bytes: MAX_MESSAGE_BYTES,
                poll: None,
            })
            .await;
        tracing::info!(broker = %broker.id, session = %handle.session_id, "broker connected");
        state.metrics.brokers_connected.inc();
        tokio::spawn(
            Drain {
                store: state.store.clone(),
                replica: state.replica_id,
                broker: broker.id,
                session: handle.session_id,
                outbox: outbox.clone(),
                wake: handle.wake.clone(),
                backstop: state.config.drain_backstop,
                cancel: cancel.clone(),
                metrics: state.metrics.clone(),
            }
            .run(),
        );
        tokio::spawn(writer::ping(
            affinity.clone(),
            outbox.clone(),
            state.config.heartbeat_interval,
        ));
        if let Err(err) = reader::run(&state, &broker, &handle, &outbox, &mut stream).await {
            tracing::warn!(broker = %broker.id, %err, "closing the control channel");
            outbox.close(err.close());
        }
        state.metrics.brokers_connected.dec();
    }

    cancel.cancel();
    state.registry.remove(broker.id, &handle);
    if affinity.release().await {
        events::announce_broker(&*state.store, &*state.bus, broker.id, false).await;
    }
    let _ = writer.await;
    close::linger(&mut stream).await;
}

/// Starts a session on either transport: claims affinity (newest wins),
/// requeues work in flight on older sessions and applies the broker's
/// reported states. The caller registers the session and says welcome.
async fn start(
    state: &HubState,
    broker: &Broker,
    affinity: &Affinity,
    agents: Vec<AgentStatus>,
) -> Result<(), StartError> {
    let took_over = affinity.claim().await?;
    // Work in flight counts an attempt only if the last session ended by
    // itself (the broker closed, crashed or went silent), not when a new
    // connection superseded a live one. A poll session never ends by
    // itself before it lapses, so a poll session's start always counts:
    // otherwise a broker that crashes on some work and restarts within
    // the lapse would be sent it forever.
    let ended_by_itself = !took_over || affinity.transport == Transport::Poll;
    let dead_letter_after = ended_by_itself.then_some(state.config.max_attempts);
    let report = state
        .store
        .requeue_broker_in_flight(broker.id, dead_letter_after)
        .await?;
    if report.requeued() > 0 {
        let requeued = report.requeued();
        tracing::info!(broker = %broker.id, requeued, "resending work in flight on older sessions");
    }
    if report.messages_failed + report.intents_failed > 0 {
        tracing::warn!(
            broker = %broker.id, ?report,
            "failed work that ended every session it was sent on (dead letters)"
        );
    }
    state.metrics.observe_requeue(&report);
    events::publish_dead_letters(&*state.store, &*state.bus, &report).await;
    events::announce_broker(&*state.store, &*state.bus, broker.id, true).await;
    for report in agents {
        match apply::status(state, broker, report).await {
            Ok(()) | Err(ApplyError::NotOwn(_)) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// A duration as the milliseconds a frame carries.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
