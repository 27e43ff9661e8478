//! The poll transport: the control channel as short HTTP requests, for
//! brokers whose network does not keep a WebSocket open (NAT, proxies
//! that strip `Upgrade`, runtimes that only make requests).
//!
//! Three `POST` requests, each signed like the WebSocket upgrade (a fresh
//! nonce per request, see [`crate::auth`]), each with a JSON body:
//!
//! - [`POLL_HELLO_PATH`]: the body is a `hello` frame; the answer is a
//!   `welcome` frame whose [`PollTerms`] say how to poll. This starts a
//!   session, exactly as a `hello` on a socket does.
//! - [`POLL_PATH`]: a [`PollRequest`]; the answer is a [`PollResponse`]
//!   with the work the hub claimed for the broker, as the frames a socket
//!   would carry, or none after waiting up to `wait_ms`.
//! - [`REPORT_PATH`]: a [`ReportRequest`] with `status`, `result` and `ack`
//!   frames; the answer is a [`PollResponse`] holding an error frame for
//!   each frame the hub refused.
//!
//! Every frame in a body is a whole frame with its version, as on a socket.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{BrokerFrame, Envelope, HubFrame, PROTOCOL_VERSION};

/// Starts a poll session.
pub const POLL_HELLO_PATH: &str = "/v1/brokers/poll/hello";
/// Claims the broker's pending work, waiting for some if there is none.
pub const POLL_PATH: &str = "/v1/brokers/poll";
/// Reports statuses, results and acks.
pub const REPORT_PATH: &str = "/v1/brokers/poll/report";

/// Largest request body the hub reads on the poll transport.
pub const MAX_POLL_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Most frames in one poll or report request.
pub const MAX_POLL_FRAMES: usize = 1000;
/// Largest poll answer the hub sends: the frames of one answer add up to at
/// most this much as JSON (one frame alone always fits); the rest stays
/// pending for the next poll. A broker may refuse larger answers.
pub const MAX_POLL_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// How a poll session is to be kept, sent with its `welcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PollTerms {
    /// Longest `wait_ms` the hub honours.
    pub max_wait_ms: u64,
    /// Work a poll returned must be acknowledged as received (`ack` with
    /// `received`, at the latest in the next poll) before this long has
    /// passed; after that the hub sends it again.
    pub lease_ms: u64,
    /// A session with no poll or report for this long has lapsed: the
    /// broker is offline and must say `hello` again.
    pub lapse_ms: u64,
    /// Most frames one poll answers with.
    pub max_frames: u32,
}

/// `POST` [`POLL_PATH`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PollRequest {
    /// From the session's `welcome`.
    pub session_id: Uuid,
    /// Applied first, in order, exactly as on [`REPORT_PATH`]: typically
    /// the `ack` of everything the previous poll returned.
    #[serde(default)]
    pub frames: Vec<Envelope<BrokerFrame>>,
    /// How long to wait for work when there is none (capped at
    /// [`PollTerms::max_wait_ms`]); 0 answers at once.
    #[serde(default)]
    pub wait_ms: u64,
    /// Most work frames wanted (capped at [`PollTerms::max_frames`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frames: Option<u32>,
}

/// `POST` [`REPORT_PATH`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    pub session_id: Uuid,
    pub frames: Vec<Envelope<BrokerFrame>>,
}

/// The answer to a poll or a report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PollResponse {
    pub frames: Vec<Envelope<HubFrame>>,
}

impl PollResponse {
    pub fn new(frames: Vec<HubFrame>) -> Self {
        Self {
            frames: frames.into_iter().map(Envelope::new).collect(),
        }
    }
}

/// The frames of a request, each checked for this protocol's version.
pub fn frames_of(frames: Vec<Envelope<BrokerFrame>>) -> Result<Vec<BrokerFrame>, u32> {
    frames
        .into_iter()
        .map(|e| {
            if e.v == PROTOCOL_VERSION {
                Ok(e.frame)
            } else {
                Err(e.v)
            }
        })
        .collect()
}
