#![doc = include_str!("../README.md")]

pub mod auth;
pub mod poll;
mod words;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use words::{Op, Phase, UnknownWord};

/// Version carried by every frame as `v`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Path of the WebSocket upgrade on the hub.
pub const CONNECT_PATH: &str = "/v1/brokers/connect";

/// Largest WebSocket message either side accepts; larger ones close the
/// socket with a protocol error.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest WebSocket frame (fragments of a message) either side accepts.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Largest message body, and largest agent definition (name, command,
/// env), the hub accepts, as compact JSON. The hub sends each message and
/// each dispatch as one unfragmented frame, so this is what fits in
/// [`MAX_FRAME_BYTES`] with the envelope and ids around it; anything larger
/// would be refused by every broker, again at every reconnect.
pub const MAX_PAYLOAD_BYTES: usize = MAX_FRAME_BYTES - 4 * 1024;

/// A payload over [`MAX_PAYLOAD_BYTES`].
#[derive(Debug, thiserror::Error)]
#[error(
    "{len} bytes as JSON; at most {} fit in one control-channel frame",
    MAX_PAYLOAD_BYTES
)]
pub struct TooLarge {
    /// The payload's size as compact JSON.
    pub len: usize,
}

/// Checks, before anything is written, that `payload` will fit in the frame
/// that carries it to a broker.
pub fn check_payload<T: Serialize>(payload: &T) -> Result<(), TooLarge> {
    /// Counts bytes instead of keeping them.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; a value that cannot serialize is
    // not something the hub received as JSON.
    let _ = serde_json::to_writer(&mut count, payload);
    if count.0 > MAX_PAYLOAD_BYTES {
        return Err(TooLarge { len: count.0 });
    }
    Ok(())
}

/// A frame with its version: `{"v": 1, "type": ..., ...fields}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Envelope<T> {
    pub v: u32,
    #[serde(flatten)]
    pub frame: T,
}

impl<T> Envelope<T> {
    pub fn new(frame: T) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            frame,
        }
    }
}

/// Frames the hub sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubFrame {
    /// First frame after the broker's `hello`: the session is live.
    Welcome {
        session_id: Uuid,
        /// The hub pings this often; a broker may treat a silence of three
        /// intervals as a dead connection.
        heartbeat_ms: u64,
        max_message_bytes: usize,
        /// Only on the poll transport: how to poll.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        poll: Option<poll::PollTerms>,
    },
    Dispatch(Dispatch),
    /// A named operation of the broker's runtime itself, not of one agent.
    BrokerCall(BrokerCall),
    Message(AgentMessage),
    Error(ErrorFrame),
}

/// Run the broker runtime's operation `name` with `args` and answer with a
/// `result` frame for `id`. Like a dispatch, `id` is the idempotency key;
/// unlike one, it belongs to no agent and waits for no other work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BrokerCall {
    pub id: Uuid,
    pub name: String,
    #[serde(default)]
    pub args: Value,
}

/// Frames the broker sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BrokerFrame {
    /// First frame after the upgrade: the state of every agent the broker
    /// runs, so the hub resyncs after a reconnect.
    Hello {
        agents: Vec<AgentStatus>,
    },
    /// Outcome of a dispatch. Sent once per dispatch id; a redelivered
    /// dispatch is answered again with the remembered outcome.
    Result(DispatchResult),
    /// Messages durably handed to their agents.
    Ack {
        #[serde(default)]
        message_ids: Vec<Uuid>,
        /// Dispatches, broker calls and messages the broker has received
        /// and will answer (with a `result`) or ack later. Needed only on
        /// the poll transport, where work nobody acknowledged is sent again
        /// (see [`poll::PollTerms`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        received: Vec<Uuid>,
    },
    /// An agent changed phase.
    Status(AgentStatus),
    Error(ErrorFrame),
}

/// Run `op` on one agent. `id` is the idempotency key: a broker that has
/// seen it already must not run it again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Dispatch {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub op: Op,
    /// For [`Op::Call`]: the operation's name (see [`check_op_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub agent: AgentSpec,
    #[serde(default)]
    pub args: Value,
}

/// What a broker needs to run an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentSpec {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A message for one agent. Per agent, `seq` increases in the order the
/// messages must be handed over; `id` is the idempotency key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentMessage {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub seq: i64,
    pub body: Value,
    /// Files sent with the message: the broker fetches each (see
    /// [`ATTACHMENT_PATH`]) into the agent's directory before it acks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentRef>,
}

/// Where a broker fetches an attachment: `GET` with `{id}` replaced, signed
/// like the control channel's upgrade.
pub const ATTACHMENT_PATH: &str = "/v1/brokers/attachments/{id}";

/// A file sent with a message, as the message frame names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttachmentRef {
    pub id: Uuid,
    /// The file name, already sanitized by the hub (see [`file_name`]).
    pub name: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
}

/// Longest attachment file name, in bytes.
pub const MAX_FILE_NAME: usize = 200;

/// The name a file is stored under, from the name a client gave it: the
/// last path component (after `/` or `\\`), without control characters,
/// without leading dots or spaces, at most [`MAX_FILE_NAME`] bytes;
/// `attachment` if nothing is left. The result never names a directory
/// other than the one it is written to.
pub fn file_name(given: &str) -> String {
    let last = given.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last.chars().filter(|c| !c.is_control()).collect();
    let trimmed = cleaned.trim_start_matches(['.', ' ']).trim_end();
    let mut name = String::new();
    for c in trimmed.chars() {
        if name.len() + c.len_utf8() > MAX_FILE_NAME {
            break;
        }
        name.push(c);
    }
    if name.is_empty() {
        "attachment".to_owned()
    } else {
        name
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DispatchResult {
    pub dispatch_id: Uuid,
    pub ok: bool,
    /// On success: details such as the new phase or a pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// On failure: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On failure: a machine-readable reason, at most [`MAX_OP_NAME`]
    /// bytes: [`UNKNOWN_OPERATION`], [`INVALID_ARGS`], or a word of the
    /// runtime's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// [`DispatchResult::code`] of a call whose operation the runtime does not
/// have.
pub const UNKNOWN_OPERATION: &str = "unknown_operation";
/// [`DispatchResult::code`] of a call whose `args` the operation refused.
pub const INVALID_ARGS: &str = "invalid_args";

/// Longest operation name (and result code), in bytes.
pub const MAX_OP_NAME: usize = 64;

/// An operation name that is not one.
#[derive(Debug, thiserror::Error)]
#[error(
    "operation names are 1 to {MAX_OP_NAME} characters: a lowercase letter, then lowercase \
     letters, digits, '.', '_' or '-'"
)]
pub struct BadOpName;

/// Checks an operation name: `[a-z][a-z0-9._-]*`, at most [`MAX_OP_NAME`]
/// bytes. Names are plain words so they can sit in a URL path, a metric
/// label or a log line unescaped.
pub fn check_op_name(name: &str) -> Result<(), BadOpName> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok && name.len() <= MAX_OP_NAME {
        Ok(())
    } else {
        Err(BadOpName)
    }
}

/// An agent's phase as the broker sees it. `seq` increases with every
/// report about the agent, across broker restarts too (brokers use a clock
/// based counter), so the hub ignores reports that arrive late.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentStatus {
    pub agent_id: Uuid,
    pub phase: Phase,
    pub seq: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

/// Error codes of error frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed frame, unknown type, wrong version, binary data, oversize.
    Protocol,
    /// The frame names an agent, dispatch or message that is not this broker's.
    Forbidden,
    /// A newer session of this broker took over; this socket closes.
    Superseded,
    /// The hub could not process the frame now (e.g. database down); resend later.
    Unavailable,
    /// The hub is shutting down.
    ShuttingDown,
}

/// Why a text frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is not valid JSON for this protocol: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    Version(u32),
}

/// Reads one frame, checking the version first so a newer peer gets a
/// clear error rather than a parse failure.
pub fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, DecodeError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let Version { v } = serde_json::from_str(text)?;
    if v != PROTOCOL_VERSION {
        return Err(DecodeError::Version(v));
    }
    Ok(serde_json::from_str::<Envelope<T>>(text)?.frame)
}

/// Writes one frame with its version.
pub fn encode<T: Serialize>(frame: &T) -> String {
    serde_json::to_string(&Envelope::new(frame)).expect("frames always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_never_leave_their_directory() {
        assert_eq!(file_name("../../etc/passwd"), "passwd");
        assert_eq!(file_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(file_name("/abs/report.pdf"), "report.pdf");
        assert_eq!(file_name(".."), "attachment");
        assert_eq!(file_name("."), "attachment");
        assert_eq!(file_name(""), "attachment");
        assert_eq!(file_name("dir/"), "attachment");
        assert_eq!(file_name(".bashrc"), "bashrc");
        assert_eq!(file_name("a\u{0}b\nc\u{7f}.txt"), "abc.txt");
        assert_eq!(file_name("  spaced.txt  "), "spaced.txt");
        let long = "é".repeat(300);
        assert!(file_name(&long).len() <= MAX_FILE_NAME);
        assert_eq!(file_name("Résumé 2026.pdf"), "Résumé 2026.pdf");
    }

    /// The largest payload the hub accepts still fits in one frame, as a
    /// message and as the agent definition of a dispatch.
    #[test]
    fn the_largest_accepted_payload_fits_in_one_frame() {
        let body = Value::String("x".repeat(MAX_PAYLOAD_BYTES - 2));
        assert!(check_payload(&body).is_ok());
        let message = HubFrame::Message(AgentMessage {
            id: Uuid::max(),
            agent_id: Uuid::max(),
            seq: i64::MAX,
            body,
            attachments: Vec::new(),
        });
        assert!(encode(&message).len() <= MAX_FRAME_BYTES);

        let mut spec = AgentSpec {
            name: "n".repeat(64),
            command: vec!["sh".into()],
            env: Default::default(),
        };
        let room = MAX_PAYLOAD_BYTES - serde_json::to_vec(&spec).map_or(0, |v| v.len());
        spec.env.insert("K".into(), "v".repeat(room - 6));
        assert!(check_payload(&spec).is_ok(), "exactly at the limit");
        let dispatch = HubFrame::Dispatch(Dispatch {
            id: Uuid::max(),
            agent_id: Uuid::max(),
            op: Op::Restart,
            name: None,
            agent: spec.clone(),
            args: Value::Object(Default::default()),
        });
        assert!(encode(&dispatch).len() <= MAX_FRAME_BYTES);

        spec.env.insert("L".into(), String::new());
        assert!(check_payload(&spec).is_err(), "one byte more is refused");

        // A call: the hub checks the definition and the arguments together.
        spec.env.clear();
        let mut args = serde_json::json!({ "a": "" });
        let room = MAX_PAYLOAD_BYTES - serde_json::to_vec(&(&spec, &args)).map_or(0, |v| v.len());
        args["a"] = Value::String("x".repeat(room));
        assert!(
            check_payload(&(&spec, &args)).is_ok(),
            "exactly at the limit"
        );
        let call = HubFrame::Dispatch(Dispatch {
            id: Uuid::max(),
            agent_id: Uuid::max(),
            op: Op::Call,
            name: Some("n".repeat(MAX_OP_NAME)),
            agent: spec,
            args,
        });
        assert!(encode(&call).len() <= MAX_FRAME_BYTES);
    }

    #[test]
    fn operation_names_are_plain_words() {
        for good in ["inspect", "files.read", "env-needs", "a", "x_1"] {
            assert!(check_op_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(MAX_OP_NAME + 1);
        for bad in ["", "Inspect", "1x", ".x", "a b", "a/b", "é", long.as_str()] {
            assert!(check_op_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frames_round_trip_with_version_and_type() {
        let frame = BrokerFrame::Ack {
            message_ids: vec![Uuid::nil()],
            received: Vec::new(),
        };
        let text = encode(&frame);
        assert_eq!(
            text,
            r#"{"v":1,"type":"ack","message_ids":["00000000-0000-0000-0000-000000000000"]}"#
        );
        assert_eq!(decode::<BrokerFrame>(&text).unwrap(), frame);
    }

    #[test]
    fn wrong_version_and_unknown_type_are_refused() {
        assert!(matches!(
            decode::<BrokerFrame>(r#"{"v":2,"type":"ack","message_ids":[]}"#),
            Err(DecodeError::Version(2))
        ));
        assert!(matches!(
            decode::<BrokerFrame>(r#"{"v":1,"type":"launch_missiles"}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(decode::<BrokerFrame>("not json").is_err());
    }
}
