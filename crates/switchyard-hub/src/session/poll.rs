//! The poll transport: a broker session kept by short HTTP requests
//! instead of a socket, for brokers that cannot keep a WebSocket open.
//!
//! The same session rules as a socket's, on three requests (each signed
//! like the upgrade, with a nonce recorded so no request can be replayed):
//!
//! - `hello` starts a session exactly as a socket's `hello` does
//!   ([`super::start`]: affinity claimed, newest wins; work in flight on
//!   older sessions requeued; reported states applied) and answers with
//!   `welcome` and the [`PollTerms`].
//! - `poll` names the session, applies the frames it carries (the acks of
//!   the previous poll), then claims the broker's work with the same
//!   [`Claimer`] a socket's drain uses, in the broker's one per-agent
//!   order. With nothing to claim it waits, registered in the replica's
//!   [`super::Registry`] like a socket's drain, so work written on any
//!   replica wakes it through the bus.
//! - `report` applies `status`, `result` and `ack` frames.
//!
//! Invariants kept here:
//! - A poll of a session that is no longer the broker's live one is
//!   refused with 409 `superseded` before it applies or claims anything;
//!   a poll moves the session's affinity to the replica it arrived at
//!   (compare-and-swap on the session id), so wake-ups follow the broker.
//! - What a poll returned is leased: each poll first puts back what the
//!   earlier ones returned and the broker has not said it received
//!   ([`switchyard_store::WorkStore::requeue_unacknowledged`]) and sends it
//!   again, in order; the sweeper does the same when the lease runs out.
//!   A lost answer therefore costs one poll, never a message.
//! - An answer holds at most [`MAX_POLL_RESPONSE_BYTES`] of frames; rows
//!   claimed beyond that are put back uncounted.
//! - A session with no poll or report for three heartbeat intervals has
//!   lapsed: the sweeper clears its affinity (compare-and-clear).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use switchyard_proto::poll::{
    MAX_POLL_FRAMES, MAX_POLL_RESPONSE_BYTES, PollRequest, PollTerms, ReportRequest, frames_of,
};
use switchyard_proto::{BrokerFrame, HubFrame, MAX_MESSAGE_BYTES, decode, encode};
use switchyard_store::{Broker, SessionId, StoreError, Transport};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::apply::{ApplyError, apply};
use super::drain::{Claimer, SessionHandle, WorkId};
use super::hello::{self, HelloError};
use super::{StartError, millis, start};
use crate::affinity::{Affinity, AffinityError};
use crate::api::error::ApiError;
use crate::state::HubState;

/// Most work frames one poll answers with.
pub(crate) const MAX_FRAMES: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PollError {
    #[error(transparent)]
    Auth(#[from] HelloError),
    #[error("{0}")]
    Body(String),
    #[error("at most {MAX_POLL_FRAMES} frames per request")]
    TooManyFrames,
    #[error("unsupported protocol version {0} (this hub speaks 1)")]
    Version(u32),
    #[error("this session is no longer the broker's live one; say hello again")]
    Superseded,
    #[error(
        "this replica holds its maximum of {0} broker sessions and waiting polls; try another replica"
    )]
    AtCapacity(usize),
    #[error("could not start the session: {0}")]
    Start(#[from] StartError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not record a broker frame: {0}")]
    Apply(ApplyError),
}

impl From<AffinityError> for PollError {
    fn from(err: AffinityError) -> Self {
        match err {
            AffinityError::Superseded => PollError::Superseded,
            AffinityError::Store(err) => PollError::Store(err),
        }
    }
}

impl From<PollError> for ApiError {
    fn from(err: PollError) -> Self {
        let message = err.to_string();
        match err {
            PollError::Auth(err) => err.into(),
            PollError::Body(_) | PollError::Version(_) => ApiError::bad_request(message),
            PollError::TooManyFrames => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            PollError::Superseded => ApiError::new(StatusCode::CONFLICT, "superseded", message),
            PollError::Store(err) => err.into(),
            PollError::AtCapacity(_) | PollError::Start(_) | PollError::Apply(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
        }
    }
}

/// `POST /v1/brokers/poll/hello`: the body is a `hello` frame.
pub(crate) async fn hello(
    State(state): State<HubState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    detached(body, move |body, _gone| async move {
        start_session(&state, &headers, &body).await
    })
    .await
}

/// `POST /v1/brokers/poll`.
pub(crate) async fn poll(
    State(state): State<HubState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    detached(body, move |body, gone| async move {
        claim(&state, &headers, &body, &gone).await
    })
    .await
}

/// `POST /v1/brokers/poll/report`.
pub(crate) async fn report(
    State(state): State<HubState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    detached(body, move |body, _gone| async move {
        apply_report(&state, &headers, &body).await
    })
    .await
}

/// Runs a request's work, given its body, on a task of its own, and
/// answers with what it returns. When a client goes away, hyper drops its
/// handler at whatever await it is in; a transaction begun there would be
/// abandoned halfway and its connection handed back in an unknown state.
/// On its own task the work runs to its end; `gone` tells it the client
/// left, so a waiting poll stops waiting instead of claiming work nobody
/// will receive.
async fn detached<F, Fut>(body: Result<Bytes, BytesRejection>, work: F) -> Response
where
    F: FnOnce(Bytes, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Vec<String>, PollError>> + Send + 'static,
{
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(rejection).into_response(),
    };
    let gone = CancellationToken::new();
    let _on_drop = gone.clone().drop_guard();
    let work = work(body, gone);
    match tokio::spawn(async move { respond(work.await) }).await {
        Ok(response) => response,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the hub is shutting down",
        )
        .into_response(),
    }
}

/// A body that could not be read (too large, or the connection failed).
fn body_error(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "payload_too_large"
    } else {
        "bad_request"
    };
    ApiError::new(status, code, rejection.body_text())
}

/// The terms every poll session of this replica gets.
fn terms(state: &HubState) -> PollTerms {
    PollTerms {
        max_wait_ms: millis(state.config.poll_max_wait),
        lease_ms: millis(state.config.poll_lease),
        lapse_ms: millis(state.config.poll_lapse()),
        max_frames: MAX_FRAMES,
    }
}

async fn start_session(
    state: &HubState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<String>, PollError> {
    let broker = hello::authenticate(&*state.store, headers).await?;
    let text = std::str::from_utf8(body).map_err(|_| PollError::Body("not UTF-8".into()))?;
    let agents = match decode::<BrokerFrame>(text) {
        Ok(BrokerFrame::Hello { agents }) => agents,
        Ok(_) => return Err(PollError::Body("the body must be a hello frame".into())),
        Err(err) => return Err(PollError::Body(err.to_string())),
    };
    let session = SessionId::new();
    let affinity = affinity(state, &broker, session);
    start(state, &broker, &affinity, agents).await?;
    state.registry.supersede_others(broker.id, session);
    tracing::info!(broker = %broker.id, %session, "broker connected (polling)");
    Ok(vec![encode(&HubFrame::Welcome {
        session_id: session.0,
        heartbeat_ms: millis(state.config.heartbeat_interval),
        max_message_bytes: MAX_MESSAGE_BYTES,
        poll: Some(terms(state)),
    })])
}

async fn claim(
    state: &HubState,
    headers: &HeaderMap,
    body: &[u8],
    gone: &CancellationToken,
) -> Result<Vec<String>, PollError> {
    // A waiting poll holds a session slot, like a socket: at the cap,
    // nothing else is worth doing.
    let _permit = state
        .session_permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| PollError::AtCapacity(state.config.max_sessions))?;
    let broker = hello::authenticate(&*state.store, headers).await?;
    let request: PollRequest = parse(body)?;
    let frames = checked_frames(request.frames)?;
    let session = SessionId(request.session_id);
    let affinity = affinity(state, &broker, session);
    affinity.resume().await?;
    let mut answer = apply_all(state, &broker, frames).await?;

    let report = state
        .store
        .requeue_unacknowledged(broker.id, state.config.max_attempts)
        .await?;
    if report.requeued() > 0 {
        tracing::info!(broker = %broker.id, requeued = report.requeued(), "sending again what earlier polls returned and the broker did not acknowledge");
    }
    state.metrics.observe_requeue(&report);
    crate::events::publish_dead_letters(&*state.store, &*state.bus, &report).await;

    let limit = request
        .max_frames
        .unwrap_or(MAX_FRAMES)
        .clamp(1, MAX_FRAMES);
    let wait = Duration::from_millis(request.wait_ms).min(state.config.poll_max_wait);
    let waiting = Waiting::register(state, &broker, session);
    let mut claimer = Claimer::new(state.store.clone(), state.replica_id, broker.id, session);
    let deadline = Instant::now() + wait;
    let mut heartbeat = Instant::now() + state.config.heartbeat_interval;
    loop {
        let pass = claimer.pass(limit, true).await;
        let (work, mut unsent) = fit(pass.frames, limit, answer_bytes(&answer));
        unsent.extend(pass.unsent);
        claimer.unclaim(&unsent).await;
        if !work.is_empty() {
            for (frame, _) in &work {
                state.metrics.count_claimed(frame);
            }
            answer.extend(work.into_iter().map(|(_, text)| text));
            return Ok(answer);
        }
        if let Some(err) = pass.failed {
            return Err(err.into());
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(answer);
        }
        tokio::select! {
            () = waiting.handle.wake.notified() => {}
            () = tokio::time::sleep(state.config.drain_backstop.min(deadline - now)) => {}
            // Replaced by a newer poll or session here, or shutting down.
            () = waiting.handle.cancel.cancelled() => return Ok(answer),
            // The client went away: claim nothing more for it.
            () = gone.cancelled() => return Ok(answer),
        }
        // A heartbeat, not a resume: a stale poll must not pull the
        // session's wake-ups back to its replica.
        if Instant::now() >= heartbeat {
            affinity.heartbeat().await?;
            heartbeat = Instant::now() + state.config.heartbeat_interval;
        }
    }
}

async fn apply_report(
    state: &HubState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<String>, PollError> {
    let broker = hello::authenticate(&*state.store, headers).await?;
    let request: ReportRequest = parse(body)?;
    let frames = checked_frames(request.frames)?;
    // A report keeps the session alive but does not move it: the broker's
    // waiting poll may be on another replica, and wake-ups must reach it.
    affinity(state, &broker, SessionId(request.session_id))
        .heartbeat()
        .await?;
    apply_all(state, &broker, frames).await
}

fn affinity(state: &HubState, broker: &Broker, session: SessionId) -> Affinity {
    Affinity::new(
        state.store.clone(),
        state.replica_id,
        broker.id,
        session,
        Transport::Poll,
    )
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PollError> {
    serde_json::from_slice(body).map_err(|err| PollError::Body(format!("malformed body: {err}")))
}

fn checked_frames(
    frames: Vec<switchyard_proto::Envelope<BrokerFrame>>,
) -> Result<Vec<BrokerFrame>, PollError> {
    if frames.len() > MAX_POLL_FRAMES {
        return Err(PollError::TooManyFrames);
    }
    frames_of(frames).map_err(PollError::Version)
}

/// Applies the frames in order; answers with an error frame for each one
/// refused.
async fn apply_all(
    state: &HubState,
    broker: &Broker,
    frames: Vec<BrokerFrame>,
) -> Result<Vec<String>, PollError> {
    let mut answers = Vec::new();
    for frame in frames {
        if let Some(answer) = apply(state, broker, frame)
            .await
            .map_err(PollError::Apply)?
        {
            answers.push(encode(&answer));
        }
    }
    Ok(answers)
}

fn answer_bytes(answer: &[String]) -> usize {
    answer.iter().map(|f| f.len() + 1).sum()
}

/// The prefix of `frames` that fits in one answer next to `used` bytes
/// (at most `limit` frames and [`MAX_POLL_RESPONSE_BYTES`]; the first
/// frame always), encoded, and the rows of the rest. A prefix keeps each
/// agent's order: what is left out comes after what is sent.
fn fit(
    frames: Vec<(HubFrame, WorkId)>,
    limit: u32,
    used: usize,
) -> (Vec<(HubFrame, String)>, Vec<WorkId>) {
    let mut bytes = used;
    let mut sent = Vec::new();
    let mut unsent = Vec::new();
    for (frame, id) in frames {
        let text = encode(&frame);
        let full = sent.len() >= limit as usize
            || (!sent.is_empty() && bytes + text.len() + 1 > MAX_POLL_RESPONSE_BYTES);
        if full || !unsent.is_empty() {
            unsent.push(id);
            continue;
        }
        bytes += text.len() + 1;
        sent.push((frame, text));
    }
    (sent, unsent)
}

/// The answer: `{"frames":[...]}`, from frames encoded once.
fn respond(result: Result<Vec<String>, PollError>) -> Response {
    match result {
        Ok(frames) => {
            let mut body = String::with_capacity(answer_bytes(&frames) + 16);
            body.push_str("{\"frames\":[");
            body.push_str(&frames.join(","));
            body.push_str("]}");
            let mut response = body.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(err) => {
            if matches!(
                err,
                PollError::Store(_) | PollError::Apply(_) | PollError::Start(_)
            ) {
                tracing::warn!(%err, "poll request failed");
            }
            ApiError::from(err).into_response()
        }
    }
}

/// A poll waiting for work, registered so that wake-ups for its broker
/// reach it; unregistered when dropped (also when the client went away and
/// the request was dropped).
struct Waiting<'a> {
    state: &'a HubState,
    broker: switchyard_store::BrokerId,
    handle: SessionHandle,
}

impl<'a> Waiting<'a> {
    fn register(state: &'a HubState, broker: &Broker, session: SessionId) -> Self {
        let handle = SessionHandle {
            session_id: session,
            outbox: None,
            wake: Arc::new(Notify::new()),
            cancel: state.shutdown.child_token(),
        };
        state.registry.insert_poll(broker.id, handle.clone());
        Self {
            state,
            broker: broker.id,
            handle,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.state.registry.remove(self.broker, &self.handle);
    }
}
