//! An in-process bench broker on the poll transport: signed `POST`s to one
//! replica (a fresh nonce per request), one poll at a time, and the same
//! cheapest agent as the WebSocket bench broker. The messages of an answer
//! count as acked (in the shared [`AckBook`]) as soon as the answer is
//! read, because the very next request, sent at once, carries their `ack`;
//! dispatches are acknowledged and answered (`status`, `result`) in that
//! same request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use switchyard_proto::auth::Handshake;
use switchyard_proto::poll::{POLL_HELLO_PATH, POLL_PATH, PollRequest, PollResponse};
use switchyard_proto::{BrokerFrame, Envelope, HubFrame, PROTOCOL_VERSION, encode};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::broker::{AckBook, BenchBroker, BrokerCounts, answer_call, answer_dispatch};

/// How long the hello may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a poll waits for work (capped by the hub's terms). Well under
/// the session's lapse, so an idle broker stays online.
const WAIT: Duration = Duration::from_secs(10);
/// How much longer than its wait a poll may take before it counts as lost.
const REQUEST_MARGIN: Duration = Duration::from_secs(10);
/// Failed requests (network, timeout, 503) retried in a row before the
/// broker gives up.
const MAX_RETRIES: u32 = 5;
/// Pause before a retry, times the attempt.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Where and as whom a poll bench broker makes its requests.
#[derive(Debug)]
struct Endpoint {
    http: reqwest::Client,
    base: String,
    broker: String,
    secret: String,
}

/// A request the hub did not answer with `200`, or that did not arrive.
#[derive(Debug)]
struct Failed {
    /// Worth sending again: the network, a timeout, or `503`.
    transient: bool,
    why: String,
}

impl Endpoint {
    /// One signed `POST` of `body` (fresh nonce), bounded by `timeout`;
    /// the frames of its `200` answer.
    async fn post(
        &self,
        path: &str,
        body: String,
        timeout: Duration,
    ) -> Result<Vec<HubFrame>, Failed> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .timeout(timeout)
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in Handshake::new(&self.broker, &self.secret).headers() {
            request = request.header(name, value);
        }
        let network = |err: reqwest::Error| Failed {
            transient: true,
            why: format!("POST {path}: {err}"),
        };
        let response = request.send().await.map_err(network)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(network)?;
        if status != 200 {
            return Err(Failed {
                transient: status == 503,
                why: format!("POST {path} answered {status}: {text}"),
            });
        }
        let answer: PollResponse = serde_json::from_str(&text).map_err(|err| Failed {
            transient: false,
            why: format!("POST {path} answered {text}: {err}"),
        })?;
        answer
            .frames
            .into_iter()
            .map(|Envelope { v, frame }| {
                if v == PROTOCOL_VERSION {
                    Ok(frame)
                } else {
                    Err(Failed {
                        transient: false,
                        why: format!("POST {path} answered a frame of version {v}"),
                    })
                }
            })
            .collect()
    }
}

/// Says hello (no agents) on the poll transport to the replica at `base`,
/// reads the welcome and starts polling; the returned broker stops with
/// [`BenchBroker::close`] (or by itself, after [`MAX_RETRIES`] failed
/// requests in a row or any refusal).
pub(crate) async fn connect(
    http: reqwest::Client,
    base: &str,
    broker: &str,
    secret: &str,
    acks: Arc<AckBook>,
) -> anyhow::Result<BenchBroker> {
    let endpoint = Endpoint {
        http,
        base: base.to_owned(),
        broker: broker.to_owned(),
        secret: secret.to_owned(),
    };
    let hello = encode(&BrokerFrame::Hello { agents: vec![] });
    let welcome = endpoint
        .post(POLL_HELLO_PATH, hello, HELLO_TIMEOUT)
        .await
        .map_err(|failed| anyhow::anyhow!(failed.why))
        .context("poll hello of a bench broker")?;
    let (session_id, terms) = match welcome.into_iter().next() {
        Some(HubFrame::Welcome {
            session_id,
            poll: Some(terms),
            ..
        }) => (session_id, terms),
        other => bail!("expected a welcome with poll terms, got {other:?}"),
    };
    let wait = WAIT.min(Duration::from_millis(terms.max_wait_ms));
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(endpoint, session_id, wait, acks, stop.clone()));
    Ok(BenchBroker::spawned(stop, task))
}

async fn serve(
    endpoint: Endpoint,
    session_id: Uuid,
    wait: Duration,
    acks: Arc<AckBook>,
    stop: CancellationToken,
) -> anyhow::Result<BrokerCounts> {
    let mut counts = BrokerCounts::default();
    // What the next poll carries: the ack of the previous answer, then the
    // answers to its dispatches.
    let mut outgoing: Vec<BrokerFrame> = Vec::new();
    let mut failures = 0u32;
    loop {
        let body = serde_json::to_string(&PollRequest {
            session_id,
            frames: outgoing.iter().cloned().map(Envelope::new).collect(),
            wait_ms: wait.as_millis() as u64,
            max_frames: None,
        })?;
        let answered = tokio::select! {
            // Dropping the waiting poll ends it; nothing is in flight for
            // the bench once it stops.
            () = stop.cancelled() => return Ok(counts),
            answered = endpoint.post(POLL_PATH, body, wait + REQUEST_MARGIN) => answered,
        };
        let frames = match answered {
            Ok(frames) => {
                failures = 0;
                frames
            }
            // Sent again as is: acks and results are idempotent and
            // statuses carry their seq; what the lost answer held comes
            // again in the next one.
            Err(failed) if failed.transient && failures < MAX_RETRIES => {
                failures += 1;
                tracing::debug!(why = failed.why, failures, "poll bench broker retries");
                tokio::select! {
                    () = stop.cancelled() => return Ok(counts),
                    () = tokio::time::sleep(RETRY_PAUSE * failures) => continue,
                }
            }
            Err(failed) => {
                if stop.is_cancelled() {
                    return Ok(counts);
                }
                bail!("poll bench broker: {}", failed.why);
            }
        };
        let at = Instant::now();
        outgoing.clear();
        let mut message_ids = Vec::new();
        let mut received = Vec::new();
        let mut replies = Vec::new();
        for frame in frames {
            match frame {
                HubFrame::Message(message) => {
                    counts.message_frames += 1;
                    message_ids.push(message.id);
                }
                HubFrame::Dispatch(dispatch) => {
                    counts.dispatches += 1;
                    received.push(dispatch.id);
                    replies.extend(answer_dispatch(dispatch));
                }
                HubFrame::BrokerCall(call) => {
                    counts.dispatches += 1;
                    received.push(call.id);
                    replies.push(answer_call(call));
                }
                HubFrame::Error(error) => {
                    bail!("poll bench broker: the hub refused a frame: {error:?}")
                }
                HubFrame::Welcome { .. } => bail!("poll bench broker: a welcome in a poll answer"),
            }
        }
        // The broker has these messages and acks them in the request it
        // sends next, at once: the same moment the WebSocket bench broker
        // records.
        acks.record(&message_ids, at);
        if !message_ids.is_empty() || !received.is_empty() {
            counts.ack_frames += 1;
            outgoing.push(BrokerFrame::Ack {
                message_ids,
                received,
            });
        }
        outgoing.extend(replies);
    }
}
