//! One session on the poll transport: `hello`, then polls until the
//! session ends, with a reporter task beside them.
//!
//! The work a poll returns goes to the same [`Executor`] a socket feeds,
//! so dedup (dispatch outcomes remembered, inbox ids) and acks are one
//! path for both transports. The loop says, in its next poll, that it
//! received everything the previous poll returned (the hub sends again
//! what a poll returned and nobody received), so it polls again at once.
//! The reporter sends acks, statuses and results as they happen, in
//! `report` requests, an operation's statuses before its result.

use std::sync::Arc;
use std::time::Duration;

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

use crate::executor::{BROKER_WORKER, Executor, Job, Replies};
use crate::files::HubClient;
use crate::reports::StatusFeed;
use crate::runtime::Runtime;
use crate::session::{Ended, SessionError};

/// How long a request may take beyond the wait it asks for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most frames in one report (the hub takes at most 1000).
const MAX_REPORT_FRAMES: usize = 500;
/// Most acks in one report.
const MAX_REPORT_ACKS: usize = 1000;
/// Pause before a failed report is sent again.
const REPORT_RETRY: Duration = Duration::from_millis(500);
/// First pause before a failed poll is sent again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a session's end waits for its reporter to send what is queued.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// An HTTP client for the poll transport: it follows no redirect (a
/// signed request must not be sent elsewhere) and bounds every request.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// A poll session kept across a failed attempt to upgrade (`auto`): it is
/// polled again without a new `hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Kept {
    session_id: Uuid,
    terms: PollTerms,
}

/// Runs one poll session against the hub at `base` (the one `kept`, or a
/// new one) until it ends, the shutdown, or `until`: then it ends with
/// [`Ended::Rotate`] and the session, so the caller can try the WebSocket
/// and, if the upgrade is refused again, go on polling it.
pub(crate) async fn run(
    client: Arc<HubClient>,
    runtime: &Arc<dyn Runtime>,
    executor: &mut Executor,
    shutdown: &CancellationToken,
    until: Option<Instant>,
    kept: Option<Kept>,
) -> Result<Ended, SessionError> {
    let hub = Hub(client.clone());
    let mut status_feed = StatusFeed::subscribe(runtime);
    let Kept { session_id, terms } = match kept {
        Some(kept) => kept,
        None => {
            let hello = BrokerFrame::Hello {
                agents: runtime.statuses(),
            };
            let (session_id, terms) = tokio::select! {
                () = shutdown.cancelled() => return Ok(Ended::Shutdown),
                welcome = hub.hello(&hello) => welcome?,
            };
            Kept { session_id, terms }
        }
    };
    tracing::info!(%session_id, ?terms, "poll session is live");

    let (acks_tx, acks) = mpsc::unbounded_channel();
    let (results_tx, results) = mpsc::unbounded_channel();
    let replies = Replies::new(results_tx, acks_tx, client);

    let (ended_tx, mut ended) = mpsc::channel(1);
    let reporter = tokio::spawn({
        let hub = hub.clone();
        async move {
            let err = report(&hub, session_id, &mut status_feed, results, acks).await;
            let _ = ended_tx.send(err).await;
        }
    });

    let wait_ms = terms.max_wait_ms;
    // A request that fails (network, 5xx) is sent again, on the same
    // session, until the session would have lapsed.
    let give_up_after = Duration::from_millis(terms.lapse_ms);
    let mut last_success = Instant::now();
    let mut retry = RETRY_MIN;
    // Everything the last answer held, acknowledged as received in the
    // next poll: the hub sends nothing received again.
    let mut received: Vec<Uuid> = Vec::new();
    let outcome = loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            break Ok(Ended::Rotate(Kept { session_id, terms }));
        }
        let frames: Vec<BrokerFrame> = if received.is_empty() {
            Vec::new()
        } else {
            vec![BrokerFrame::Ack {
                message_ids: Vec::new(),
                received: received.clone(),
            }]
        };
        let request = PollRequest {
            session_id,
            frames: frames.into_iter().map(Envelope::new).collect(),
            wait_ms,
            max_frames: None,
        };
        let polled = tokio::select! {
            () = shutdown.cancelled() => break Ok(Ended::Shutdown),
            () = replies.failed.cancelled() => break Err(SessionError::HandOver),
            Some(err) = ended.recv() => break Err(err),
            polled = hub.post(POLL_PATH, &request, Duration::from_millis(wait_ms)) => polled,
        };
        let work = match polled {
            Ok(work) => work,
            Err(err @ (SessionError::Http(_) | SessionError::Status(500..=599, _))) => {
                if last_success.elapsed() >= give_up_after {
                    break Err(err);
                }
                tracing::warn!("poll failed ({err}); polling again in {retry:?}");
                tokio::select! {
                    () = shutdown.cancelled() => break Ok(Ended::Shutdown),
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            Err(err) => break Err(err),
        };
        last_success = Instant::now();
        retry = RETRY_MIN;
        received.clear();
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
                    received.push(message.id);
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
    };
    // The receipts of the last answer, on the way out (a session that goes
    // on after a rotation needs them; otherwise the next session's hello
    // sends that work again anyway).
    if !received.is_empty() && matches!(outcome, Ok(Ended::Rotate(_)) | Ok(Ended::Shutdown)) {
        let request = ReportRequest {
            session_id,
            frames: vec![Envelope::new(BrokerFrame::Ack {
                message_ids: Vec::new(),
                received,
            })],
        };
        if let Err(err) = hub.post(REPORT_PATH, &request, Duration::ZERO).await {
            tracing::debug!("last receipts not sent ({err}); the hub sends that work again");
        }
    }
    // The reporter sends what is already queued (acks, results) before it
    // stops, briefly.
    drop(replies);
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
        while let Some(err) = ended.recv().await {
            tracing::debug!("reporter ended: {err}");
        }
    })
    .await;
    reporter.abort();
    outcome
}

/// Sends acks, statuses and results as they happen, until the session
/// ends (or every sender is gone and all is sent); returns why it ended.
async fn report(
    hub: &Hub,
    session_id: Uuid,
    status_feed: &mut StatusFeed,
    mut results: mpsc::UnboundedReceiver<DispatchResult>,
    mut acks: mpsc::UnboundedReceiver<Uuid>,
) -> SessionError {
    loop {
        let mut frames = tokio::select! {
            statuses = status_feed.next() => statuses,
            result = results.recv() => match result {
                Some(result) => {
                    let mut frames = status_feed.pending();
                    frames.push(BrokerFrame::Result(result));
                    frames
                }
                None => return SessionError::Closed(" (session over)".into()),
            },
            Some(id) = acks.recv() => vec![BrokerFrame::Ack { message_ids: vec![id], received: Vec::new() }],
        };
        // Whatever else is at hand shares the request.
        let mut acked = Vec::new();
        while frames.len() < MAX_REPORT_FRAMES && acked.len() < MAX_REPORT_ACKS {
            frames.extend(status_feed.pending());
            match (results.try_recv(), acks.try_recv()) {
                (Err(_), Err(_)) => break,
                (result, ack) => {
                    if let Ok(result) = result {
                        frames.extend(status_feed.pending());
                        frames.push(BrokerFrame::Result(result));
                    }
                    if let Ok(id) = ack {
                        acked.push(id);
                    }
                }
            }
        }
        if !acked.is_empty() {
            frames.push(BrokerFrame::Ack {
                message_ids: acked,
                received: Vec::new(),
            });
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
                // next session's hub sends their dispatches (and the
                // unacked messages) again.
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
struct Hub(Arc<HubClient>);

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
        let request = self
            .0
            .signed(reqwest::Method::POST, path)
            .timeout(wait + REQUEST_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
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
