//! One session on the poll transport: `hello`, then polls until the
//! session ends, with a reporter task beside them.
//!
//! The work a poll returns goes to the same [`Executor`] a socket feeds,
//! so dedup (dispatch outcomes remembered, inbox ids) and acks are one
//! path for both transports. The loop acknowledges, in its next poll,
//! every dispatch the previous poll returned (received) and every message
//! the executor has handed to its agent; it waits for those acks first
//! (up to half the lease), because the hub sends again whatever the
//! previous poll returned and was not acknowledged. Statuses and results
//! go out as soon as they happen, in `report` requests, statuses first.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::auth::Handshake;
use switchyard_proto::poll::{
    MAX_POLL_RESPONSE_BYTES, POLL_HELLO_PATH, POLL_PATH, PollRequest, PollTerms, REPORT_PATH,
    ReportRequest,
};
use switchyard_proto::{
    BrokerFrame, DispatchResult, Envelope, ErrorCode, ErrorFrame, HubFrame, decode, encode,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::connection::BrokerConfig;
use crate::executor::{BROKER_WORKER, Executor, Job, Replies};
use crate::files::Fetcher;
use crate::reports::StatusFeed;
use crate::runtime::Runtime;
use crate::session::{Ended, SessionError};

/// How long a request may take beyond the wait it asks for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most frames in one report (the hub takes at most 1000).
const MAX_REPORT_FRAMES: usize = 500;
/// Pause before a failed report is sent again.
const REPORT_RETRY: Duration = Duration::from_millis(500);

/// An HTTP client for the poll transport: it follows no redirect (a
/// signed request must not be sent elsewhere) and bounds every request.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// Runs one poll session against the hub at `base` until it ends, the
/// shutdown, or `until` (then it ends cleanly, so the caller can try the
/// WebSocket again).
pub(crate) async fn run(
    http: &reqwest::Client,
    base: &str,
    config: &BrokerConfig,
    runtime: &Arc<dyn Runtime>,
    executor: &mut Executor,
    shutdown: &CancellationToken,
    until: Option<Instant>,
) -> Result<Ended, SessionError> {
    let hub = Hub {
        http: http.clone(),
        base: base.to_owned(),
        broker: config.broker.clone(),
        secret: config.secret.clone(),
    };
    let mut status_feed = StatusFeed::subscribe(runtime);
    let hello = BrokerFrame::Hello {
        agents: runtime.statuses(),
    };
    let (session_id, terms) = tokio::select! {
        () = shutdown.cancelled() => return Ok(Ended::Shutdown),
        welcome = hub.hello(&hello) => welcome?,
    };
    tracing::info!(%session_id, ?terms, "poll session is live");

    let (acks_tx, mut acks) = mpsc::unbounded_channel();
    let (results_tx, results) = mpsc::unbounded_channel();
    let replies = Replies {
        results: results_tx,
        acks: acks_tx,
        files: Arc::new(Fetcher {
            http: http.clone(),
            base: base.to_owned(),
            broker: config.broker.clone(),
            secret: config.secret.clone(),
        }),
    };
    let (ended_tx, mut ended) = mpsc::channel(1);
    let reporter = tokio::spawn({
        let hub = hub.clone();
        async move {
            let err = report(&hub, session_id, &mut status_feed, results).await;
            let _ = ended_tx.send(err).await;
        }
    });

    let wait_ms = terms.max_wait_ms;
    let ack_within = Duration::from_millis(terms.lease_ms / 2);
    let mut acked: Vec<Uuid> = Vec::new();
    let mut received: Vec<Uuid> = Vec::new();
    let outcome = loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            break Ok(Ended::Rotate);
        }
        let mut frames = Vec::new();
        if !acked.is_empty() || !received.is_empty() {
            frames.push(BrokerFrame::Ack {
                message_ids: std::mem::take(&mut acked),
                dispatch_ids: std::mem::take(&mut received),
            });
        }
        let request = PollRequest {
            session_id,
            frames: frames.into_iter().map(Envelope::new).collect(),
            wait_ms,
            max_frames: None,
        };
        let polled = tokio::select! {
            () = shutdown.cancelled() => break Ok(Ended::Shutdown),
            Some(err) = ended.recv() => break Err(err),
            polled = hub.post(POLL_PATH, &request, Duration::from_millis(wait_ms)) => polled,
        };
        let work = match polled {
            Ok(work) => work,
            Err(err) => break Err(err),
        };
        let mut expected = HashSet::new();
        for frame in work {
            match frame {
                HubFrame::Dispatch(dispatch) => {
                    received.push(dispatch.id);
                    let agent_id = dispatch.agent_id;
                    executor
                        .submit(agent_id, Job::Dispatch(dispatch), replies.clone())
                        .await;
                }
                HubFrame::BrokerCall(call) => {
                    received.push(call.id);
                    executor
                        .submit(BROKER_WORKER, Job::BrokerCall(call), replies.clone())
                        .await;
                }
                HubFrame::Message(message) => {
                    expected.insert(message.id);
                    let agent_id = message.agent_id;
                    executor
                        .submit(agent_id, Job::Message(message), replies.clone())
                        .await;
                }
                HubFrame::Error(ErrorFrame { code, message }) => {
                    tracing::warn!(?code, "the hub refused a frame: {message}");
                }
                HubFrame::Welcome { .. } => tracing::warn!("ignoring a second welcome"),
            }
        }
        // Acks of this answer's messages go in the next poll; wait for them
        // (the hub would send unacknowledged ones again).
        let deadline = Instant::now() + ack_within;
        while let Ok(id) = acks.try_recv() {
            expected.remove(&id);
            acked.push(id);
        }
        while !expected.is_empty() {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some(id)) => {
                    expected.remove(&id);
                    acked.push(id);
                }
                Ok(None) | Err(_) => break,
            }
        }
    };
    // What was handled but not acknowledged yet, on the way out.
    while let Ok(id) = acks.try_recv() {
        acked.push(id);
    }
    if outcome.is_ok() && (!acked.is_empty() || !received.is_empty()) {
        let request = ReportRequest {
            session_id,
            frames: vec![Envelope::new(BrokerFrame::Ack {
                message_ids: acked,
                dispatch_ids: received,
            })],
        };
        if let Err(err) = hub.post(REPORT_PATH, &request, Duration::ZERO).await {
            tracing::debug!("last acks not sent ({err}); the hub sends those messages again");
        }
    }
    reporter.abort();
    outcome
}

/// Sends statuses and results as they happen, until the session ends;
/// returns why it ended.
async fn report(
    hub: &Hub,
    session_id: Uuid,
    status_feed: &mut StatusFeed,
    mut results: mpsc::UnboundedReceiver<DispatchResult>,
) -> SessionError {
    loop {
        let mut frames = tokio::select! {
            statuses = status_feed.next() => statuses,
            Some(result) = results.recv() => {
                let mut frames = status_feed.pending();
                frames.push(BrokerFrame::Result(result));
                frames
            }
        };
        // Whatever else is at hand shares the request.
        while frames.len() < MAX_REPORT_FRAMES {
            frames.extend(status_feed.pending());
            match results.try_recv() {
                Ok(result) => {
                    frames.extend(status_feed.pending());
                    frames.push(BrokerFrame::Result(result));
                }
                Err(_) => break,
            }
        }
        let request = ReportRequest {
            session_id,
            frames: frames.into_iter().map(Envelope::new).collect(),
        };
        loop {
            match hub.post(REPORT_PATH, &request, Duration::ZERO).await {
                Ok(answers) => {
                    for answer in answers {
                        if let HubFrame::Error(ErrorFrame { code, message }) = answer {
                            tracing::warn!(?code, "the hub refused a report: {message}");
                        }
                    }
                    break;
                }
                // The session is over: results are remembered, and the
                // next session's hub sends their dispatches again.
                Err(err @ (SessionError::Superseded(_) | SessionError::Unauthorized)) => {
                    return err;
                }
                Err(err) => {
                    tracing::warn!("report failed ({err}); sending it again");
                    tokio::time::sleep(REPORT_RETRY).await;
                }
            }
        }
    }
}

/// One hub, as the poll transport reaches it.
#[derive(Clone)]
struct Hub {
    http: reqwest::Client,
    base: String,
    broker: String,
    secret: String,
}

impl Hub {
    async fn hello(&self, hello: &BrokerFrame) -> Result<(Uuid, PollTerms), SessionError> {
        let frames = self
            .send(POLL_HELLO_PATH, encode(hello), Duration::ZERO)
            .await?;
        match frames.into_iter().next() {
            Some(HubFrame::Welcome {
                session_id,
                poll: Some(terms),
                ..
            }) => Ok((session_id, terms)),
            other => Err(SessionError::Unexpected(format!("{other:?}"))),
        }
    }

    async fn post(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        wait: Duration,
    ) -> Result<Vec<HubFrame>, SessionError> {
        let body = serde_json::to_string(body)
            .map_err(|e| SessionError::Unexpected(format!("cannot encode a request: {e}")))?;
        self.send(path, body, wait).await
    }

    /// One signed request (a fresh nonce each time); the frames of the
    /// answer.
    async fn send(
        &self,
        path: &str,
        body: String,
        wait: Duration,
    ) -> Result<Vec<HubFrame>, SessionError> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .timeout(wait + REQUEST_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        for (name, value) in Handshake::new(&self.broker, &self.secret).headers() {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SessionError::Http(e.to_string()))?;
        let status = response.status();
        // Checked before reading: the hub never sends more.
        let limit = MAX_POLL_RESPONSE_BYTES + 64 * 1024;
        if response
            .content_length()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(SessionError::Http(format!(
                "the hub's answer is larger than {limit} bytes"
            )));
        }
        let text = read_bounded(response, limit).await?;
        match status.as_u16() {
            200 => frames(&text),
            401 => Err(SessionError::Unauthorized),
            409 => Err(SessionError::Superseded(text)),
            _ => Err(SessionError::Status(status.as_u16(), text)),
        }
    }
}

/// The body, refused past `limit` bytes (a chunked answer has no length).
async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<String, SessionError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| SessionError::Http(e.to_string()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(SessionError::Http(format!(
                "the hub's answer is larger than {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| SessionError::Http("the answer is not UTF-8".into()))
}

/// The frames of an answer: `{"frames": [...]}`.
fn frames(text: &str) -> Result<Vec<HubFrame>, SessionError> {
    #[derive(serde::Deserialize)]
    struct Answer {
        frames: Vec<serde_json::Value>,
    }
    let answer: Answer = serde_json::from_str(text)
        .map_err(|e| SessionError::Unexpected(format!("unreadable answer: {e}")))?;
    answer
        .frames
        .into_iter()
        .map(|frame| {
            let frame: HubFrame = decode(&frame.to_string())
                .map_err(|e| SessionError::Unexpected(format!("unreadable frame: {e}")))?;
            match frame {
                HubFrame::Error(ErrorFrame {
                    code: ErrorCode::Superseded,
                    message,
                }) => Err(SessionError::Superseded(message)),
                frame => Ok(frame),
            }
        })
        .collect()
}
