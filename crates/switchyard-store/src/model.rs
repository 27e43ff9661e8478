//! Rows as the hub sees them, and the inputs that create them.
//!
//! One `FromRow` struct per table decodes on both backends: UUIDs are
//! `UUID`/`BLOB`, JSON is `JSONB`/`TEXT`, timestamps are
//! `TIMESTAMPTZ`/RFC 3339 `TEXT`, and state words are `TEXT` on both.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;

use crate::ids::{
    AgentId, AttachmentId, BroadcastId, BrokerId, IntentId, MessageId, ReplicaId, SessionId,
};

use switchyard_proto::text_enum;
pub use switchyard_proto::{Op, Phase, UnknownWord};

text_enum!(
    /// Whether a broker holds a live session somewhere.
    BrokerStatus {
        Online => "online",
        Offline => "offline",
    }
);

text_enum!(
    /// How a broker's session reaches the hub.
    Transport {
        /// One WebSocket (`/v1/brokers/connect`).
        Ws => "ws",
        /// HTTP requests: hello, poll, report.
        Poll => "poll",
    }
);

text_enum!(
    /// State of a dispatch intent. `done`, `failed` and `cancelled` are
    /// final.
    IntentState {
        Pending => "pending",
        InProgress => "in_progress",
        Done => "done",
        Failed => "failed",
        /// Withdrawn before it was sent.
        Cancelled => "cancelled",
    }
);

text_enum!(
    /// State of a message. `delivered`, `expired`, `failed` and
    /// `cancelled` are final.
    MessageState {
        Pending => "pending",
        Dispatched => "dispatched",
        Delivered => "delivered",
        Expired => "expired",
        Failed => "failed",
        /// Withdrawn before it was sent.
        Cancelled => "cancelled",
    }
);

/// A hub replica's registry row.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Replica {
    pub instance_id: ReplicaId,
    pub address: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// A registered broker with its affinity fields.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Broker {
    pub id: BrokerId,
    pub name: String,
    /// Never leaves the hub.
    #[serde(skip)]
    pub secret_hash: String,
    #[sqlx(try_from = "String")]
    pub status: BrokerStatus,
    pub connected_replica: Option<ReplicaId>,
    pub session_id: Option<SessionId>,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// The transport of the broker's latest session (`ws` before any).
    #[sqlx(try_from = "String")]
    pub transport: Transport,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Broker {
    /// The live session's holder, if any.
    pub fn affinity(&self) -> Option<Affinity> {
        match (self.connected_replica, self.session_id, self.connected_at) {
            (Some(replica), Some(session), Some(connected_at)) => Some(Affinity {
                replica,
                session,
                connected_at,
            }),
            _ => None,
        }
    }
}

/// Which replica holds a broker's live session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Affinity {
    pub replica: ReplicaId,
    pub session: SessionId,
    pub connected_at: DateTime<Utc>,
}

/// Answer to a session heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionHeartbeat {
    /// The session is the broker's live one; its heartbeat was recorded.
    Current,
    /// Another session (or none) is current: the caller must close this socket.
    Superseded,
}

/// An agent definition.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Agent {
    pub id: AgentId,
    pub name: String,
    pub broker_id: BrokerId,
    #[schema(value_type = Vec<String>)]
    pub command: Json<Vec<String>>,
    #[schema(value_type = BTreeMap<String, String>)]
    pub env: Json<BTreeMap<String, String>>,
    /// `key=value` pairs a broadcast can select the agent by.
    #[schema(value_type = BTreeMap<String, String>)]
    pub labels: Json<BTreeMap<String, String>>,
    #[sqlx(try_from = "String")]
    pub phase: Phase,
    /// Highest status sequence applied; older reports are ignored.
    pub status_seq: i64,
    /// The exit code in the last applied status report, if it had one.
    pub exit_code: Option<i32>,
    /// The broker's explanation in the last applied status report (why
    /// the agent is in `error`, say), if it had one.
    pub detail: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A broker's status report about one of its agents, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusReport {
    pub phase: Phase,
    /// The broker's report sequence; only a newer report is applied.
    pub seq: i64,
    pub exit_code: Option<i32>,
    /// At most [`StatusReport::MAX_DETAIL_BYTES`], without NUL bytes.
    pub detail: Option<String>,
}

impl StatusReport {
    /// The longest detail kept; a longer one is cut (at a character
    /// boundary) and marked with `…`.
    pub const MAX_DETAIL_BYTES: usize = 4096;

    /// A report of a phase alone.
    pub fn phase(phase: Phase, seq: i64) -> Self {
        Self::new(phase, seq, None, None)
    }

    /// A report as a broker sent it, bounded for storage: the detail is cut
    /// to [`Self::MAX_DETAIL_BYTES`] and NUL bytes (which PostgreSQL cannot
    /// store) become U+FFFD, so no report is refused for its detail.
    pub fn new(phase: Phase, seq: i64, exit_code: Option<i32>, detail: Option<String>) -> Self {
        let detail = detail.map(bounded_text);
        Self {
            phase,
            seq,
            exit_code,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_detail_is_bounded_and_free_of_nul() {
        let long = "é".repeat(StatusReport::MAX_DETAIL_BYTES);
        let report = StatusReport::new(Phase::Error, 1, Some(1), Some(long));
        let detail = report.detail.unwrap();
        assert!(detail.len() <= StatusReport::MAX_DETAIL_BYTES);
        assert!(detail.ends_with('…'));
        let report = StatusReport::new(Phase::Error, 1, None, Some("a\0b".into()));
        assert_eq!(report.detail.as_deref(), Some("a\u{fffd}b"));
    }
}

/// Input of [`crate::AgentStore::create_agent`].
#[derive(Clone, Debug)]
pub struct NewAgent {
    pub id: AgentId,
    pub name: String,
    pub broker_id: BrokerId,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

/// A durable request to run `op` for an agent on its broker.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DispatchIntent {
    pub id: IntentId,
    pub broker_id: BrokerId,
    /// `None` for a broker-scoped call (addressed to the broker's runtime).
    pub agent_id: Option<AgentId>,
    /// Per-agent order of creation (and of commit).
    pub seq: i64,
    #[sqlx(try_from = "String")]
    pub op: Op,
    /// For [`Op::Call`]: the operation's name.
    pub name: Option<String>,
    #[schema(value_type = Value)]
    pub args: Json<Value>,
    #[sqlx(try_from = "String")]
    pub state: IntentState,
    #[schema(value_type = Option<Value>)]
    pub result: Option<Json<Value>>,
    pub error: Option<String>,
    /// For a failed intent: the broker's machine-readable reason, if it
    /// gave one (`unknown_operation`, `invalid_args`, ...).
    pub error_code: Option<String>,
    pub claimed_by: Option<ReplicaId>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub deadline: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    /// Digest of the request that created the row under its key.
    #[serde(skip_serializing)]
    pub request_digest: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Input of [`crate::WorkStore::insert_intents`]. The broker is the agent's.
#[derive(Clone, Debug)]
pub struct NewIntent {
    pub id: IntentId,
    pub agent_id: AgentId,
    pub op: Op,
    /// The operation's name: `Some` exactly for [`Op::Call`].
    pub name: Option<String>,
    pub args: Value,
    pub deadline: DateTime<Utc>,
    /// The ledger key: a repeated key is answered with the row it created.
    pub idempotency_key: Option<String>,
    /// What the request asked for; a repeated key with another digest is
    /// refused ([`crate::Conflict::KeyReused`]).
    pub request_digest: Option<String>,
}

/// Input of [`crate::WorkStore::insert_broker_call`]: a named operation
/// addressed to a broker's runtime itself, not to one of its agents.
#[derive(Clone, Debug)]
pub struct NewBrokerCall {
    pub id: IntentId,
    pub broker_id: BrokerId,
    pub name: String,
    pub args: Value,
    pub deadline: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    pub request_digest: Option<String>,
}

/// A message to one agent.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Message {
    pub id: MessageId,
    pub agent_id: AgentId,
    pub broker_id: BrokerId,
    /// Per-agent FIFO position.
    pub seq: i64,
    #[schema(value_type = Value)]
    pub body: Json<Value>,
    #[sqlx(try_from = "String")]
    pub state: MessageState,
    pub claimed_by: Option<ReplicaId>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    /// Why the message failed (a dead letter), if it did.
    pub error: Option<String>,
    /// The broadcast this message is one agent's copy of.
    pub broadcast_id: Option<BroadcastId>,
    pub idempotency_key: Option<String>,
    /// Digest of the request that created the row under its key.
    #[serde(skip_serializing)]
    pub request_digest: Option<String>,
    pub expires_at: DateTime<Utc>,
    /// Not sent before this instant; until then it holds back its agent's
    /// later work.
    pub deliver_after: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// How many files were sent with it (see [`Attachment`]).
    pub attachments: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A file sent with a message; its bytes are read in chunks
/// ([`crate::AttachmentStore::attachment_chunk`]).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Attachment {
    pub id: AttachmentId,
    pub message_id: MessageId,
    pub broker_id: BrokerId,
    /// Its place among the message's files.
    pub position: i32,
    /// Already sanitized (`switchyard_proto::file_name`).
    pub name: String,
    pub size: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
}

/// A file to store with a new message: its bytes are read from `content`
/// ([`crate::ATTACHMENT_CHUNK`] at a time) inside the message's transaction.
pub struct NewAttachment {
    pub id: AttachmentId,
    pub name: String,
    /// The bytes `content` yields; anything else fails the insert.
    pub size: u64,
    pub sha256: String,
    pub content: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
}

impl std::fmt::Debug for NewAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewAttachment")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Input of [`crate::WorkStore::insert_messages`]. The broker is the agent's.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub id: MessageId,
    pub agent_id: AgentId,
    pub body: Value,
    pub expires_at: DateTime<Utc>,
    pub deliver_after: Option<DateTime<Utc>>,
    /// As for [`NewIntent::idempotency_key`].
    pub idempotency_key: Option<String>,
    /// As for [`NewIntent::request_digest`].
    pub request_digest: Option<String>,
}

/// What a cancel found (see [`crate::WorkStore::cancel_intent`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was pending and is cancelled now.
    Cancelled,
    /// It had been cancelled before; nothing changed.
    AlreadyCancelled,
    /// It was sent or finished already; nothing changed.
    NotPending,
}

/// Who a broadcast goes to: every live agent of a broker, or every live
/// agent whose labels contain all of these pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Broker(BrokerId),
    Labels(BTreeMap<String, String>),
}

/// The most agents one broadcast may reach; a target matching more is
/// refused ([`crate::Invalid::TooManyAgents`]) and nothing is written.
pub const MAX_BROADCAST_AGENTS: usize = 10_000;

/// Input of [`crate::WorkStore::insert_broadcast`].
#[derive(Clone, Debug)]
pub struct NewBroadcast {
    pub id: BroadcastId,
    pub target: Target,
    pub body: Value,
    pub expires_at: DateTime<Utc>,
    pub deliver_after: Option<DateTime<Utc>>,
    /// The ledger key of the whole broadcast (see [`NewIntent`]).
    pub idempotency_key: Option<String>,
    pub request_digest: Option<String>,
}

/// What [`crate::WorkStore::insert_broadcast`] wrote, or found under its
/// key: one message per agent, by agent id.
#[derive(Clone, Debug, PartialEq)]
pub struct Broadcast {
    pub id: BroadcastId,
    /// False when the idempotency key named an earlier broadcast.
    pub created: bool,
    pub messages: Vec<Inserted<Message>>,
}

/// A row returned by an idempotent insert.
#[derive(Clone, Debug, PartialEq)]
pub struct Inserted<T> {
    pub row: T,
    /// False when the idempotency key matched an existing row, which is
    /// returned unchanged.
    pub created: bool,
    /// For a created row: the replica that owned its broker's session, read
    /// under a lock that `claim_affinity` must wait for until the insert
    /// committed. So either this is the owner to wake, or a session
    /// claimed later drains the row itself on connect; routing needs no
    /// second read. `None` when no replica owned it, and for rows not
    /// created.
    pub owner: Option<ReplicaId>,
}

/// How a dispatch intent ended, as reported by the broker (or decided by the hub).
#[derive(Clone, Debug, PartialEq)]
pub enum IntentOutcome {
    Done(Value),
    /// Why, and the broker's machine-readable reason if it gave one.
    Failed {
        error: String,
        code: Option<String>,
    },
}

impl IntentOutcome {
    /// A failure without a machine-readable reason.
    pub fn failed(error: impl Into<String>) -> Self {
        Self::Failed {
            error: error.into(),
            code: None,
        }
    }

    /// An outcome as a broker reported it, bounded for storage the way
    /// [`StatusReport::new`] bounds a detail, so no result is refused for
    /// what it carries: NUL bytes (which PostgreSQL cannot store) in the
    /// result's strings and keys and in the error become U+FFFD, the error
    /// is cut to [`StatusReport::MAX_DETAIL_BYTES`], and a code that is not
    /// a plain word (`[a-z][a-z0-9._-]*`, at most 64 bytes) is dropped.
    pub fn from_broker(
        ok: bool,
        result: Option<Value>,
        error: Option<String>,
        code: Option<String>,
    ) -> Self {
        if ok {
            let mut result = result.unwrap_or_default();
            scrub_nul(&mut result);
            return Self::Done(result);
        }
        let error =
            error.unwrap_or_else(|| "the broker reported a failure without a reason".into());
        Self::Failed {
            error: bounded_text(error),
            code: code.filter(|c| switchyard_proto::check_op_name(c).is_ok()),
        }
    }
}

/// Replaces NUL bytes in every string and key of `value` with U+FFFD.
fn scrub_nul(value: &mut Value) {
    match value {
        Value::String(text) if text.contains('\0') => *text = text.replace('\0', "\u{fffd}"),
        Value::Array(items) => items.iter_mut().for_each(scrub_nul),
        Value::Object(fields) if fields.keys().any(|k| k.contains('\0')) => {
            let taken = std::mem::take(fields);
            for (key, mut field) in taken {
                scrub_nul(&mut field);
                fields.insert(key.replace('\0', "\u{fffd}"), field);
            }
        }
        Value::Object(fields) => fields.values_mut().for_each(scrub_nul),
        _ => {}
    }
}

/// `text` with NUL bytes replaced and cut to
/// [`StatusReport::MAX_DETAIL_BYTES`] at a character boundary, marked `…`.
fn bounded_text(text: String) -> String {
    let mut text = text.replace('\0', "\u{fffd}");
    if text.len() > StatusReport::MAX_DETAIL_BYTES {
        let mut cut = StatusReport::MAX_DETAIL_BYTES - '…'.len_utf8();
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Filter for [`crate::WorkStore::list_intents`].
#[derive(Clone, Debug, Default)]
pub struct IntentFilter {
    pub broker_id: Option<BrokerId>,
    pub state: Option<IntentState>,
    /// At most this many rows, newest first.
    pub limit: u32,
}

/// Unfinished work (intents and messages, pending or in flight) of one
/// agent, or of a broker's own calls when `agent_id` is `None`: what an
/// operator reads as a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct QueueDepth {
    pub broker_id: BrokerId,
    pub agent_id: Option<AgentId>,
    pub depth: i64,
}

/// What a requeue pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequeueReport {
    pub intents_requeued: u64,
    pub intents_failed: u64,
    pub messages_requeued: u64,
    pub messages_failed: u64,
    /// The intents that failed (dead letters), for their events.
    pub failed_intents: Vec<IntentId>,
    /// The messages that failed (dead letters), for their events.
    pub failed_messages: Vec<MessageRef>,
}

/// A row a requeue statement returned: which it is and its new state.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Requeued<Id> {
    pub(crate) id: Id,
    /// None only for a broker call's intent.
    pub(crate) agent_id: Option<AgentId>,
    pub(crate) broker_id: BrokerId,
    pub(crate) state: String,
}

impl RequeueReport {
    /// The report of requeue statements that returned each row
    /// (`RETURNING id, agent_id, broker_id, state`).
    pub(crate) fn counted(
        intents: &[Requeued<IntentId>],
        messages: &[Requeued<MessageId>],
    ) -> Self {
        let failed_intents: Vec<IntentId> = intents
            .iter()
            .filter(|r| r.state == IntentState::Failed.as_str())
            .map(|r| r.id)
            .collect();
        let failed_messages: Vec<MessageRef> = messages
            .iter()
            .filter(|r| r.state == MessageState::Failed.as_str())
            .filter_map(|r| {
                Some(MessageRef {
                    id: r.id,
                    agent_id: r.agent_id?,
                    broker_id: r.broker_id,
                })
            })
            .collect();
        let pending = |states: &mut dyn Iterator<Item = &String>, state: &str| {
            states.filter(|s| *s == state).count() as u64
        };
        Self {
            intents_requeued: pending(
                &mut intents.iter().map(|r| &r.state),
                IntentState::Pending.as_str(),
            ),
            intents_failed: failed_intents.len() as u64,
            messages_requeued: pending(
                &mut messages.iter().map(|r| &r.state),
                MessageState::Pending.as_str(),
            ),
            messages_failed: failed_messages.len() as u64,
            failed_intents,
            failed_messages,
        }
    }

    /// Rows that went back to `pending`.
    pub fn requeued(&self) -> u64 {
        self.intents_requeued + self.messages_requeued
    }
}

/// When claimed work counts as abandoned.
#[derive(Clone, Copy, Debug)]
pub struct RequeuePolicy {
    /// A replica whose `last_seen` is older than this is dead, and so is
    /// every claim it holds.
    pub replica_stale_after: std::time::Duration,
    /// A claim older than this is abandoned even if its claimer lives.
    pub lease: std::time::Duration,
    /// Work a poll returned and the broker has not acknowledged after this
    /// long goes back to `pending` (it counts as an attempt).
    pub poll_lease: std::time::Duration,
    /// A row that has been claimed this many times fails instead of
    /// going back to `pending`.
    pub max_attempts: i32,
}

/// What an ack changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acked {
    /// Messages this ack moved to `delivered`.
    pub delivered: u64,
    /// Which they are, in the order `waited` gives their waits.
    pub messages: Vec<MessageRef>,
    /// Acked ids that are not messages of the acking broker.
    pub not_found: Vec<MessageId>,
    /// For each message this ack moved to `delivered`: how long it took
    /// from its acceptance (`created_at`) to this ack.
    pub waited: Vec<std::time::Duration>,
}

/// An event to append to the durable log ([`crate::EventStore`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// The SSE event name (`agent_status`, `broker_online`, ...).
    pub kind: String,
    /// The agent it concerns, if one (for `?agent=` filters).
    pub agent_id: Option<AgentId>,
    /// The event's JSON data, as sent.
    pub data: String,
}

/// An event read back from the log, with its id (the SSE `id:`).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct LoggedEvent {
    pub id: i64,
    pub kind: String,
    pub agent_id: Option<AgentId>,
    pub data: String,
}

impl LoggedEvent {
    /// Whether a reader narrowed to `agent` gets this event: events that
    /// concern no agent go only to unfiltered readers.
    pub fn concerns(&self, agent: Option<AgentId>) -> bool {
        agent.is_none_or(|a| self.agent_id == Some(a))
    }
}

/// Where the event log stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventBounds {
    /// The newest id ever appended (0 before the first).
    pub last: i64,
    /// Every id up to this one has been pruned: a reader resuming from
    /// below it has missed events.
    pub pruned_through: i64,
}

/// A message that reached a final state, named for its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct MessageRef {
    pub id: MessageId,
    pub agent_id: AgentId,
    pub broker_id: BrokerId,
}
