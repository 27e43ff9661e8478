//! A broker on the poll transport driven request by request by the test,
//! over real HTTP.
//!
//! Like [`crate::broker::RawBroker`] it has no behaviour of its own: each
//! helper makes exactly one signed request (fresh nonce) and hands back
//! what the hub answered, so a test can skip an ack, lose an answer or
//! replay a request on purpose.

use std::time::Duration;

use serde_json::Value;
use switchyard_proto::auth::Handshake;
use switchyard_proto::poll::{
    POLL_HELLO_PATH, POLL_PATH, PollRequest, PollResponse, PollTerms, REPORT_PATH, ReportRequest,
};
use switchyard_proto::{BrokerFrame, DispatchResult, Envelope, HubFrame, decode, encode};
use uuid::Uuid;

/// Longest a request may take (a poll's wait included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A poll session opened with hello and welcomed.
#[derive(Debug, Clone)]
pub struct PollBroker {
    pub http: reqwest::Client,
    pub base: String,
    pub broker: String,
    pub secret: String,
    pub session_id: Uuid,
    pub terms: PollTerms,
}

/// A refused request: its status and body.
#[derive(Debug, Clone)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
}

impl PollBroker {
    /// Says hello (no agents) to the hub at `base` and reads the welcome.
    pub async fn hello(base: &str, broker: &str, secret: &str) -> PollBroker {
        let http = reqwest::Client::new();
        let hello = encode(&BrokerFrame::Hello { agents: vec![] });
        let handshake = Handshake::new(broker, secret);
        let (status, text) = post(&http, base, POLL_HELLO_PATH, &handshake, hello).await;
        assert_eq!(status, 200, "poll hello refused: {text}");
        let answer: PollResponse =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("welcome {text}: {e}"));
        match answer.frames.into_iter().next().map(|e| e.frame) {
            Some(HubFrame::Welcome {
                session_id,
                poll: Some(terms),
                ..
            }) => PollBroker {
                http,
                base: base.to_owned(),
                broker: broker.to_owned(),
                secret: secret.to_owned(),
                session_id,
                terms,
            },
            other => panic!("expected a welcome with poll terms, got {other:?}"),
        }
    }

    /// One poll carrying `frames`, waiting up to `wait_ms`.
    pub async fn poll(
        &self,
        frames: Vec<BrokerFrame>,
        wait_ms: u64,
    ) -> Result<Vec<HubFrame>, Refused> {
        let request = PollRequest {
            session_id: self.session_id,
            frames: frames.into_iter().map(Envelope::new).collect(),
            wait_ms,
            max_frames: None,
        };
        self.request(POLL_PATH, &request).await
    }

    /// One report of `frames`; answers with the error frames of refused ones.
    pub async fn report(&self, frames: Vec<BrokerFrame>) -> Result<Vec<HubFrame>, Refused> {
        let request = ReportRequest {
            session_id: self.session_id,
            frames: frames.into_iter().map(Envelope::new).collect(),
        };
        self.request(REPORT_PATH, &request).await
    }

    /// A signed request with a fresh nonce and `body` as JSON.
    pub async fn request(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<Vec<HubFrame>, Refused> {
        let handshake = Handshake::new(&self.broker, &self.secret);
        let body = serde_json::to_string(body).expect("requests serialize");
        let (status, text) = post(&self.http, &self.base, path, &handshake, body).await;
        frames(status, &text)
    }
}

/// The frames of a 200 answer, or the refusal.
pub fn frames(status: u16, text: &str) -> Result<Vec<HubFrame>, Refused> {
    if status != 200 {
        return Err(Refused {
            status,
            body: serde_json::from_str(text).unwrap_or(Value::Null),
        });
    }
    let answer: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("poll answer {text}: {e}"));
    Ok(answer["frames"]
        .as_array()
        .unwrap_or_else(|| panic!("no frames in {text}"))
        .iter()
        .map(|f| decode(&f.to_string()).unwrap_or_else(|e| panic!("frame {f}: {e}")))
        .collect())
}

/// One `POST` with the handshake's headers; returns status and body text.
pub async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    handshake: &Handshake,
    body: String,
) -> (u16, String) {
    let mut request = http
        .post(format!("{base}{path}"))
        .timeout(REQUEST_TIMEOUT)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in handshake.headers() {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// A `result` frame saying the dispatch is done.
pub fn done(dispatch: Uuid) -> BrokerFrame {
    BrokerFrame::Result(DispatchResult {
        dispatch_id: dispatch,
        ok: true,
        result: None,
        error: None,
        code: None,
    })
}

/// An `ack` of messages (and received dispatches).
pub fn ack(message_ids: Vec<Uuid>, received: Vec<Uuid>) -> BrokerFrame {
    BrokerFrame::Ack {
        message_ids,
        received,
    }
}
