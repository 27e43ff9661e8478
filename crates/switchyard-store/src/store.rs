//! The storage interface. Both implementations ([`crate::PgStore`],
//! [`crate::SqliteStore`]) must give every method the same meaning; the
//! conformance suite in `tests/conformance.rs` runs each test against both.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::StoreResult;
use crate::ids::{AgentId, BrokerId, IntentId, MessageId, ReplicaId, SessionId};
use crate::model::{
    Acked, Affinity, Agent, Broker, DispatchIntent, Inserted, IntentFilter, IntentOutcome, Message,
    NewAgent, NewIntent, NewMessage, Phase, Replica, RequeuePolicy, RequeueReport,
    SessionHeartbeat,
};

/// One replica's claim on the cluster-singleton role.
#[async_trait]
pub trait Singleton: Send + std::fmt::Debug {
    /// Whether this contender holds the role now, acquiring it if it is
    /// free. Call before each singleton duty.
    async fn hold(&mut self) -> StoreResult<bool>;
}

/// Durable state shared by all replicas of one hub.
///
/// Invariants every implementation keeps (DESIGN.md):
/// - affinity is claimed newest-wins and cleared only by compare-and-clear
///   on the same (replica, session);
/// - a pending intent or message is claimed by exactly one caller, and
///   within one agent rows are claimed in sequence order, never past a row
///   that another replica holds in flight;
/// - `done`/`failed`/`delivered`/`expired` are final: no call moves a row
///   out of them;
/// - batch inserts are all-or-none, and a repeated idempotency key returns
///   the original row instead of a second one.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Which backend this is (`"postgres"` or `"sqlite"`), for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Round trip to the database (readiness).
    async fn ping(&self) -> StoreResult<()>;

    // --- replicas -------------------------------------------------------

    /// Inserts or refreshes this replica's registry row.
    async fn register_replica(&self, id: ReplicaId, address: &str) -> StoreResult<Replica>;

    /// Records that the replica is alive. False when its row is gone (it was
    /// reaped as dead): the caller must register again, and every session it
    /// holds has lost its affinity.
    async fn heartbeat_replica(&self, id: ReplicaId) -> StoreResult<bool>;

    /// Replicas seen within `stale_after`, oldest first.
    async fn live_replicas(&self, stale_after: Duration) -> StoreResult<Vec<Replica>>;

    /// Removes replicas not seen within `stale_after` and, in the same
    /// transaction, clears every affinity held by a replica that has no
    /// registry row. Returns the removed replicas.
    async fn reap_dead_replicas(&self, stale_after: Duration) -> StoreResult<Vec<ReplicaId>>;

    /// Removes one replica's row and releases its affinities (clean shutdown).
    /// Returns the brokers whose affinity was released.
    async fn deregister_replica(&self, id: ReplicaId) -> StoreResult<Vec<BrokerId>>;

    // --- brokers and affinity -------------------------------------------

    /// Registers a broker. `Conflict` if the name is taken.
    async fn create_broker(
        &self,
        id: BrokerId,
        name: &str,
        secret_hash: &str,
    ) -> StoreResult<Broker>;

    async fn broker(&self, id: BrokerId) -> StoreResult<Broker>;

    async fn broker_by_name(&self, name: &str) -> StoreResult<Broker>;

    /// All brokers, by name.
    async fn list_brokers(&self) -> StoreResult<Vec<Broker>>;

    /// Deregisters a broker with everything that belonged to its deleted
    /// agents. `Conflict` while it is connected or has agents that are not
    /// deleted.
    async fn delete_broker(&self, id: BrokerId) -> StoreResult<()>;

    /// Makes `(replica, session)` the broker's live session, whatever held
    /// it before (newest wins), and returns the previous holder.
    async fn claim_affinity(
        &self,
        broker: BrokerId,
        replica: ReplicaId,
        session: SessionId,
    ) -> StoreResult<Option<Affinity>>;

    /// Compare-and-clear: clears the affinity only if `(replica, session)`
    /// still holds it. Returns whether it cleared; a late release of a
    /// superseded session returns false and changes nothing.
    async fn release_affinity(
        &self,
        broker: BrokerId,
        replica: ReplicaId,
        session: SessionId,
    ) -> StoreResult<bool>;

    /// Records a heartbeat of `session`, if it is still the live one.
    async fn heartbeat_session(
        &self,
        broker: BrokerId,
        session: SessionId,
    ) -> StoreResult<SessionHeartbeat>;

    /// Clears every affinity held by `replica` (a dead replica's sockets are
    /// gone). Returns the brokers released.
    async fn release_replica_affinities(&self, replica: ReplicaId) -> StoreResult<Vec<BrokerId>>;

    // --- agents ----------------------------------------------------------

    /// Defines an agent in phase `created`. `NotFound` for an unknown
    /// broker, `Conflict` if a live agent has the name.
    async fn create_agent(&self, agent: NewAgent) -> StoreResult<Agent>;

    async fn agent(&self, id: AgentId) -> StoreResult<Agent>;

    /// The agent that currently has this name (deleted agents give up
    /// their names).
    async fn agent_by_name(&self, name: &str) -> StoreResult<Agent>;

    /// Agents (deleted ones included), optionally of one broker, by name.
    async fn list_agents(&self, broker: Option<BrokerId>) -> StoreResult<Vec<Agent>>;

    /// Applies a status report of `broker` about one of its agents, if
    /// `status_seq` is newer than the last applied. `NotFound` if the agent
    /// is not this broker's (nothing changes). Returns the agent after the
    /// report, and whether the report was applied.
    async fn apply_agent_status(
        &self,
        broker: BrokerId,
        agent: AgentId,
        phase: Phase,
        status_seq: i64,
    ) -> StoreResult<(Agent, bool)>;

    /// Marks an agent deleted (after its broker confirmed the delete). Its
    /// name becomes free; status reports about it are ignored from now on.
    async fn mark_agent_deleted(&self, id: AgentId) -> StoreResult<Agent>;

    // --- dispatch intents -----------------------------------------------

    /// Inserts intents all-or-none. A row whose idempotency key exists
    /// already is answered with the existing row (`created: false`).
    /// `NotFound` if an agent is unknown or deleted; nothing is written then.
    async fn insert_intents(
        &self,
        intents: Vec<NewIntent>,
    ) -> StoreResult<Vec<Inserted<DispatchIntent>>>;

    /// One-row form of [`Store::insert_intents`].
    async fn insert_intent(&self, intent: NewIntent) -> StoreResult<Inserted<DispatchIntent>> {
        let mut rows = self.insert_intents(vec![intent]).await?;
        rows.pop()
            .ok_or_else(|| crate::StoreError::Invalid("empty insert".into()))
    }

    /// Claims up to `limit` pending intents for `claimer` (`pending ->
    /// in_progress`, attempts + 1) of those brokers whose live session is
    /// the one given: a session that has been superseded claims nothing, so
    /// work requeued for a new session cannot be taken back by the old one.
    /// Exactly one concurrent caller gets each row; per agent, rows come in
    /// `seq` order and an agent with an intent in flight at another replica
    /// is skipped. Calls for one broker are meant to run one at a time (the
    /// hub runs one drain per session); one that overlaps another call for
    /// the same broker may claim nothing for it. The result is ordered by
    /// (agent, seq).
    async fn claim_intents(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<DispatchIntent>>;

    /// Ends an intent that is `pending` or `in_progress`. Returns false (and
    /// changes nothing) if it had already ended.
    async fn finish_intent(&self, id: IntentId, outcome: IntentOutcome) -> StoreResult<bool>;

    async fn intent(&self, id: IntentId) -> StoreResult<DispatchIntent>;

    /// The intent created with this idempotency key, if any.
    async fn intent_by_key(&self, key: &str) -> StoreResult<Option<DispatchIntent>>;

    async fn list_intents(&self, filter: IntentFilter) -> StoreResult<Vec<DispatchIntent>>;

    /// Fails every unfinished intent whose deadline has passed.
    async fn expire_intents(&self) -> StoreResult<Vec<IntentId>>;

    // --- messages --------------------------------------------------------

    /// Inserts messages all-or-none, each at the end of its agent's FIFO
    /// (batch order kept within an agent). Idempotency keys as for intents.
    async fn insert_messages(
        &self,
        messages: Vec<NewMessage>,
    ) -> StoreResult<Vec<Inserted<Message>>>;

    /// Claims up to `limit` pending messages of `brokers` for `claimer`
    /// (`pending -> dispatched`), with the same exactly-one and per-agent
    /// order rules as [`Store::claim_intents`].
    async fn claim_messages(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<Message>>;

    /// The broker confirms it handed these messages to their agents:
    /// `pending`/`dispatched` rows of this broker become `delivered`, final
    /// rows stay as they are (idempotent). Ids that are not this broker's
    /// messages change nothing and are reported back.
    async fn ack_messages(&self, broker: BrokerId, ids: &[MessageId]) -> StoreResult<Acked>;

    /// One-message form of [`Store::ack_messages`]: true when this call made
    /// it `delivered`, false if it was already final; `NotFound` if it is
    /// not this broker's.
    async fn ack_message(&self, broker: BrokerId, id: MessageId) -> StoreResult<bool> {
        let acked = self.ack_messages(broker, &[id]).await?;
        if !acked.not_found.is_empty() {
            return Err(crate::StoreError::NotFound("message"));
        }
        Ok(acked.delivered == 1)
    }

    async fn message(&self, id: MessageId) -> StoreResult<Message>;

    /// Expires every undelivered message whose TTL has passed.
    async fn expire_messages(&self) -> StoreResult<Vec<MessageId>>;

    /// Puts every claimed-but-unfinished intent and message of `broker`
    /// back to `pending`. Called when a new session of the broker starts:
    /// whatever was sent on an older socket may or may not have arrived, and
    /// the broker drops duplicates, so resending is safe and keeps order.
    async fn requeue_broker_in_flight(&self, broker: BrokerId) -> StoreResult<u64>;

    // --- auth ------------------------------------------------------------

    /// Stores an admin token digest (idempotent).
    async fn add_admin_token(&self, token_hash: &str) -> StoreResult<()>;

    /// Whether any admin token is stored.
    async fn has_admin_tokens(&self) -> StoreResult<bool>;

    /// Whether this digest belongs to a stored admin token.
    async fn admin_token_exists(&self, token_hash: &str) -> StoreResult<bool>;

    /// Records a handshake nonce of `broker`. False if it was seen before
    /// (a replay). Also forgets nonces older than `keep`, which the
    /// handshake's timestamp window already refuses.
    async fn record_nonce(
        &self,
        broker: BrokerId,
        nonce: &str,
        keep: Duration,
    ) -> StoreResult<bool>;

    // --- recovery --------------------------------------------------------

    /// Deletes finished intents (`done`, `failed`) and messages
    /// (`delivered`, `expired`, `failed`) last changed before `older_than`
    /// ago. Returns how many rows went.
    async fn prune_finished(&self, older_than: Duration) -> StoreResult<u64>;

    /// Intents and messages not finished although created more than
    /// `older_than` ago: work that is stuck (e.g. its broker is offline).
    async fn count_stuck(&self, older_than: Duration) -> StoreResult<u64>;

    /// A contender for the cluster-singleton role (the sweeper). At most one
    /// contender in the cluster holds it at a time; it is lost when its
    /// database connection dies, and another contender takes over.
    fn singleton(&self) -> Box<dyn Singleton>;

    /// Puts claimed-but-unfinished intents and messages whose claimer is
    /// dead or whose lease ran out back to `pending`, or fails them once
    /// they have been tried `max_attempts` times.
    async fn requeue_abandoned(&self, policy: RequeuePolicy) -> StoreResult<RequeueReport>;
}
