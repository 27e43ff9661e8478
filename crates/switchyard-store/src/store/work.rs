//! Sequenced work: dispatch intents and messages, each in a per-agent
//! order, claimed by one replica at a time and ended exactly once.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::types::Json;

use crate::batch::{NewRow, check_batch, replay};
use crate::dialect::{BindNow, for_each_backend, sql};
use crate::error::{Conflict, Entity, Invalid, StoreError, StoreResult};
use crate::ids::{AgentId, BroadcastId, BrokerId, IntentId, MessageId, ReplicaId, SessionId};
use crate::model::{
    Acked, Broadcast, CancelOutcome, DispatchIntent, Inserted, IntentFilter, IntentOutcome,
    IntentState, MAX_BROADCAST_AGENTS, Message, MessageRef, MessageState, NewBroadcast,
    NewBrokerCall, NewIntent, NewMessage, Op, Phase, RequeueReport, Requeued, Target,
};
use crate::rules::{DELETED, EXPIRED, INTENT, MESSAGE, SESSION_ENDED};

/// Keeps dispatch intents and messages.
#[async_trait]
pub trait WorkStore: Send + Sync {
    /// Inserts intents all-or-none. A row whose idempotency key exists
    /// already is answered with the existing row (`created: false`).
    /// `NotFound` if an agent is unknown or deleted; nothing is written then.
    async fn insert_intents(
        &self,
        intents: Vec<NewIntent>,
    ) -> StoreResult<Vec<Inserted<DispatchIntent>>>;

    /// One-row form of [`WorkStore::insert_intents`].
    async fn insert_intent(&self, intent: NewIntent) -> StoreResult<Inserted<DispatchIntent>> {
        let mut rows = self.insert_intents(vec![intent]).await?;
        rows.pop().ok_or(StoreError::Invalid(Invalid::EmptyInsert))
    }

    /// A lifecycle intent, written as one atomic step with its checks (the
    /// agent's row is locked throughout, so concurrent calls on one agent
    /// take turns):
    /// 1. a key that names an existing row answers with it (see the
    ///    idempotency rule of [`WorkStore::insert_intents`]), whatever the
    ///    agent's phase is now;
    /// 2. `Conflict::Phase` if the agent's phase is not in `allowed`;
    ///    `NotFound` if there is no such agent;
    /// 3. if the agent's latest intent is still open and does the same
    ///    operation, the call joins it (`created: false`): a hundred
    ///    concurrent starts make one dispatch;
    /// 4. otherwise the intent is inserted, next in the agent's order.
    async fn insert_lifecycle(
        &self,
        intent: NewIntent,
        allowed: &[Phase],
    ) -> StoreResult<Inserted<DispatchIntent>>;

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

    async fn list_intents(&self, filter: IntentFilter) -> StoreResult<Vec<DispatchIntent>>;

    /// Fails every unfinished intent whose deadline has passed.
    async fn expire_intents(&self) -> StoreResult<Vec<IntentId>>;

    /// Inserts messages all-or-none, each at the end of its agent's FIFO
    /// (batch order kept within an agent). Idempotency keys as for intents.
    async fn insert_messages(
        &self,
        messages: Vec<NewMessage>,
    ) -> StoreResult<Vec<Inserted<Message>>>;

    /// Claims up to `limit` pending messages of `brokers` for `claimer`
    /// (`pending -> dispatched`), with the same exactly-one and per-agent
    /// order rules as [`WorkStore::claim_intents`].
    async fn claim_messages(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<Message>>;

    /// The broker confirms it handed these messages to their agents:
    /// `pending`/`dispatched` rows of this broker become `delivered`, final
    /// rows stay as they are (idempotent). Ids that are not this broker's
    /// messages (missing or another broker's) change nothing and are
    /// reported back.
    async fn ack_messages(&self, broker: BrokerId, ids: &[MessageId]) -> StoreResult<Acked>;

    /// One-message form of [`WorkStore::ack_messages`]: true when this call
    /// made it `delivered`, false if it was already final; `NotOwned` if it
    /// is another broker's, `NotFound` if there is none.
    async fn ack_message(&self, broker: BrokerId, id: MessageId) -> StoreResult<bool> {
        let acked = self.ack_messages(broker, &[id]).await?;
        if !acked.not_found.is_empty() {
            // A message never changes broker: if it exists now, it is not ours.
            self.message(id).await?;
            return Err(StoreError::NotOwned(Entity::Message));
        }
        Ok(acked.delivered == 1)
    }

    async fn message(&self, id: MessageId) -> StoreResult<Message>;

    /// Withdraws an intent that has not been sent: `pending -> cancelled`,
    /// a final state no claim takes. Returns the row as it is now and what
    /// the cancel found.
    async fn cancel_intent(&self, id: IntentId) -> StoreResult<(DispatchIntent, CancelOutcome)>;

    /// Writes a broker-scoped call (an intent with op `call` and no agent),
    /// answering a repeated idempotency key with its row like
    /// [`WorkStore::insert_lifecycle`]. `NotFound` if the broker is
    /// unknown. Broker-scoped calls are outside every agent's order: they
    /// wait for nothing and hold back nothing.
    async fn insert_broker_call(
        &self,
        call: NewBrokerCall,
    ) -> StoreResult<Inserted<DispatchIntent>>;

    /// Claims up to `limit` pending broker-scoped calls of `broker` for
    /// `claimer`, if `session` is the broker's live session, oldest first
    /// (`pending -> in_progress`, attempts + 1). Exactly one concurrent
    /// caller gets each row.
    async fn claim_broker_calls(
        &self,
        broker: BrokerId,
        session: SessionId,
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<DispatchIntent>>;

    /// As [`WorkStore::cancel_intent`], for a message.
    async fn cancel_message(&self, id: MessageId) -> StoreResult<(Message, CancelOutcome)>;

    /// One message to every live agent the target selects, resolved and
    /// written in one transaction: the agents are locked (in id order, like
    /// every batch insert) as they are selected, so an agent created
    /// concurrently is either selected or created after the broadcast
    /// committed, and each copy goes to the end of its agent's FIFO. All or
    /// none; more than [`crate::MAX_BROADCAST_AGENTS`] agents is refused.
    /// The idempotency key is the whole broadcast's: a repeat answers with
    /// the messages it wrote then (none are added for agents created
    /// since), another digest is [`crate::Conflict::KeyReused`].
    async fn insert_broadcast(&self, broadcast: NewBroadcast) -> StoreResult<Broadcast>;

    /// Whether the agent has messages waiting to be sent (`pending`): after
    /// one of its operations finishes, they may be free to go.
    async fn has_pending_messages(&self, agent: AgentId) -> StoreResult<bool>;

    /// Expires every undelivered message whose TTL has passed.
    async fn expire_messages(&self) -> StoreResult<Vec<MessageRef>>;

    /// Puts every claimed-but-unfinished intent and message of `broker`
    /// back to `pending`. Called when a new session of the broker starts:
    /// whatever was sent on an older socket may or may not have arrived, and
    /// the broker drops duplicates, so resending is safe and keeps order.
    ///
    /// With `dead_letter_after: Some(max_attempts)` (the broker's last
    /// session ended by itself: the broker closed, crashed or went silent),
    /// the oldest row of each agent in flight is the one the broker was
    /// handling: its claim counts as an attempt, and once it has been
    /// claimed `max_attempts` times it fails instead (a dead letter, with
    /// the reason as its error), so work that ends every session it is sent
    /// on holds back only itself, never its agent's queue. Every other row
    /// goes back without its claim counting, as do all rows with `None`
    /// (the last session was superseded while alive: nobody died of it).
    async fn requeue_broker_in_flight(
        &self,
        broker: BrokerId,
        dead_letter_after: Option<i32>,
    ) -> StoreResult<RequeueReport>;

    /// At the start of each poll of a poll session: puts back to `pending`
    /// what earlier polls returned and the broker has not said it received
    /// (see [`WorkStore::receive`]), so the poll sends it again, in order. The
    /// attempt rule is that of [`WorkStore::requeue_broker_in_flight`]
    /// with `Some(max_attempts)`: work the broker never gets past fails
    /// after `max_attempts` polls instead of holding back its agent.
    async fn requeue_unacknowledged(
        &self,
        broker: BrokerId,
        max_attempts: i32,
    ) -> StoreResult<RequeueReport>;

    /// The broker says it received these dispatches (or broker calls, or
    /// messages) and will answer (ack) them: they stay in flight until it
    /// does, and no poll sends them again. Ids that are neither intents
    /// nor messages of this broker are returned.
    async fn receive(&self, broker: BrokerId, ids: &[uuid::Uuid]) -> StoreResult<Vec<uuid::Uuid>>;

    /// Puts claimed rows that were never sent back to `pending`, without
    /// counting their claim (a poll's answer had no room left for them).
    async fn unclaim(
        &self,
        broker: BrokerId,
        intents: &[IntentId],
        messages: &[MessageId],
    ) -> StoreResult<()>;
}

/// The work statements whose text genuinely differs between backends: the
/// batch insert, the claim, the batch ack and the batch receipt. Callers have checked the
/// batch ([`check_batch`]) and the sessions (not empty); the rows come back
/// in any order.
pub(crate) trait WorkDialect {
    async fn insert_intent_batch(
        &self,
        intents: Vec<NewIntent>,
    ) -> StoreResult<Vec<Inserted<DispatchIntent>>>;

    async fn insert_message_batch(
        &self,
        messages: Vec<NewMessage>,
    ) -> StoreResult<Vec<Inserted<Message>>>;

    async fn claim_intent_rows(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<DispatchIntent>>;

    async fn claim_message_rows(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<Message>>;

    async fn deliver(&self, broker: BrokerId, ids: &[MessageId]) -> StoreResult<Acked>;

    /// [`WorkStore::receive`]'s update: marks those of `ids` that are this
    /// broker's intents or messages in flight as received now, and returns
    /// every one of `ids` that is this broker's intent or message (in
    /// flight or not).
    async fn receive_rows(
        &self,
        broker: BrokerId,
        ids: &[uuid::Uuid],
    ) -> StoreResult<Vec<uuid::Uuid>>;
}

for_each_backend! {
    #[async_trait]
    impl WorkStore for Backend {
        async fn insert_intents(
            &self,
            intents: Vec<NewIntent>,
        ) -> StoreResult<Vec<Inserted<DispatchIntent>>> {
            check_batch(intents.iter().map(NewRow::key), intents.len())?;
            self.insert_intent_batch(intents).await
        }

        async fn insert_lifecycle(
            &self,
            intent: NewIntent,
            allowed: &[Phase],
        ) -> StoreResult<Inserted<DispatchIntent>> {
            let mut tx = self.write().await?;
            if let Some(key) = intent.idempotency_key.as_deref() {
                let existing = sqlx::query_as(sql!(
                    "SELECT * FROM dispatch_intents
                     WHERE idempotency_key = $1 AND idempotency_key IS NOT NULL"
                ))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = existing {
                    return replay(&intent, row);
                }
            }
            let (phase, broker): (String, BrokerId) = sqlx::query_as(sql!(
                "SELECT phase, broker_id FROM agents WHERE id = $1 @for_update"
            ))
            .bind(intent.agent_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound(Entity::Agent))?;
            let phase: Phase = phase.parse()?;
            if !allowed.contains(&phase) {
                return Err(StoreError::Conflict(Conflict::Phase(phase)));
            }
            let latest: Option<DispatchIntent> = sqlx::query_as(sql!(
                "SELECT * FROM dispatch_intents WHERE agent_id = $1 ORDER BY seq DESC LIMIT 1"
            ))
            .bind(intent.agent_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(open) = latest.filter(|l| {
                l.op == intent.op
                    && l.op.is_lifecycle()
                    && matches!(l.state, IntentState::Pending | IntentState::InProgress)
            }) {
                return Ok(Inserted {
                    row: open,
                    created: false,
                    owner: None,
                });
            }
            // The owner is read under a lock `claim_affinity` waits for (see
            // `Inserted::owner`); a wait re-reads the newest row.
            let owner: Option<ReplicaId> = sqlx::query_scalar(sql!(
                "SELECT connected_replica FROM brokers WHERE id = $1 @for_key_share"
            ))
            .bind(broker)
            .fetch_one(&mut *tx)
            .await?;
            let (seq, ord): (i64, i64) = sqlx::query_as(sql!(
                "UPDATE agents SET intent_seq = intent_seq + 1, work_seq = work_seq + 1
                 WHERE id = $1 RETURNING intent_seq, work_seq"
            ))
            .bind(intent.agent_id)
            .fetch_one(&mut *tx)
            .await?;
            let row = sqlx::query_as(sql!(
                "INSERT INTO dispatch_intents
                     (id, broker_id, agent_id, seq, ord, op, args, deadline, idempotency_key,
                      request_digest, name, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $10, $5, $6, $7, $8, $9, $11, @now, @now) RETURNING *"
            ))
            .bind(intent.id)
            .bind(broker)
            .bind(intent.agent_id)
            .bind(seq)
            .bind(intent.op.as_str())
            .bind(Json(intent.args))
            .bind(intent.deadline)
            .bind(intent.idempotency_key)
            .bind(intent.request_digest)
            .bind(ord)
            .bind(intent.name)
            .bind_now()
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Inserted {
                row,
                created: true,
                owner,
            })
        }

        async fn claim_intents(
            &self,
            sessions: &[(BrokerId, SessionId)],
            claimer: ReplicaId,
            limit: u32,
        ) -> StoreResult<Vec<DispatchIntent>> {
            if sessions.is_empty() {
                return Ok(Vec::new());
            }
            let mut rows = self.claim_intent_rows(sessions, claimer, limit).await?;
            rows.sort_by_key(|r| (r.agent_id, r.seq));
            Ok(rows)
        }

        async fn finish_intent(&self, id: IntentId, outcome: IntentOutcome) -> StoreResult<bool> {
            let (state, result, error, code) = match outcome {
                IntentOutcome::Done(result) => (IntentState::Done, Some(Json(result)), None, None),
                IntentOutcome::Failed { error, code } => (IntentState::Failed, None, Some(error), code),
            };
            let done = sqlx::query(sql!(
                "UPDATE dispatch_intents
                 SET state = $2, result = $3, error = $4, error_code = $5, updated_at = @now
                 WHERE id = $1 AND state IN {unfinished}",
                unfinished = INTENT.unfinished
            ))
            .bind(id)
            .bind(state.as_str())
            .bind(result)
            .bind(error)
            .bind(code)
            .bind_now()
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                return Ok(true);
            }
            // False for a final row, NotFound for none.
            self.intent(id).await.map(|_| false)
        }

        async fn intent(&self, id: IntentId) -> StoreResult<DispatchIntent> {
            sqlx::query_as(sql!("SELECT * FROM dispatch_intents WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(StoreError::NotFound(Entity::Intent))
        }

        async fn list_intents(&self, filter: IntentFilter) -> StoreResult<Vec<DispatchIntent>> {
            Ok(sqlx::query_as(sql!(
                "SELECT * FROM dispatch_intents
                 WHERE ($1 IS NULL OR broker_id = $1) AND ($2 IS NULL OR state = $2)
                 ORDER BY created_at DESC, seq DESC LIMIT $3"
            ))
            .bind(filter.broker_id)
            .bind(filter.state.map(IntentState::as_str))
            .bind(i64::from(filter.limit))
            .fetch_all(&self.pool)
            .await?)
        }

        async fn expire_intents(&self) -> StoreResult<Vec<IntentId>> {
            Ok(sqlx::query_scalar(sql!(
                "UPDATE dispatch_intents SET state = {failed}, error = 'deadline exceeded',
                        updated_at = @now
                 WHERE state IN {unfinished} AND deadline < @now
                 RETURNING id",
                failed = INTENT.failed,
                unfinished = INTENT.unfinished,
            ))
            .bind_now()
            .fetch_all(&self.pool)
            .await?)
        }

        async fn insert_messages(
            &self,
            messages: Vec<NewMessage>,
        ) -> StoreResult<Vec<Inserted<Message>>> {
            check_batch(messages.iter().map(NewRow::key), messages.len())?;
            self.insert_message_batch(messages).await
        }

        async fn claim_messages(
            &self,
            sessions: &[(BrokerId, SessionId)],
            claimer: ReplicaId,
            limit: u32,
        ) -> StoreResult<Vec<Message>> {
            if sessions.is_empty() {
                return Ok(Vec::new());
            }
            let mut rows = self.claim_message_rows(sessions, claimer, limit).await?;
            rows.sort_by_key(|r| (r.agent_id, r.seq));
            Ok(rows)
        }

        async fn ack_messages(&self, broker: BrokerId, ids: &[MessageId]) -> StoreResult<Acked> {
            self.deliver(broker, ids).await
        }

        async fn message(&self, id: MessageId) -> StoreResult<Message> {
            sqlx::query_as(sql!("SELECT * FROM messages WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(StoreError::NotFound(Entity::Message))
        }

        async fn insert_broker_call(
            &self,
            call: NewBrokerCall,
        ) -> StoreResult<Inserted<DispatchIntent>> {
            let mut tx = self.write().await?;
            if let Some(key) = call.idempotency_key.as_deref() {
                let existing: Option<DispatchIntent> = sqlx::query_as(sql!(
                    "SELECT * FROM dispatch_intents
                     WHERE idempotency_key = $1 AND idempotency_key IS NOT NULL"
                ))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = existing {
                    if row.request_digest != call.request_digest {
                        return Err(StoreError::Conflict(Conflict::KeyReused(key.to_owned())));
                    }
                    return Ok(Inserted { row, created: false, owner: None });
                }
            }
            // The owner is read under a lock `claim_affinity` waits for (see
            // `Inserted::owner`).
            let owner: Option<Option<ReplicaId>> = sqlx::query_scalar(sql!(
                "SELECT connected_replica FROM brokers WHERE id = $1 @for_key_share"
            ))
            .bind(call.broker_id)
            .fetch_optional(&mut *tx)
            .await?;
            let owner = owner.ok_or(StoreError::NotFound(Entity::Broker))?;
            let row = sqlx::query_as(sql!(
                "INSERT INTO dispatch_intents
                     (id, broker_id, agent_id, seq, ord, op, name, args, deadline,
                      idempotency_key, request_digest, created_at, updated_at)
                 VALUES ($1, $2, NULL, 0, 0, $3, $4, $5, $6, $7, $8, @now, @now) RETURNING *"
            ))
            .bind(call.id)
            .bind(call.broker_id)
            .bind(Op::Call.as_str())
            .bind(&call.name)
            .bind(Json(&call.args))
            .bind(call.deadline)
            .bind(call.idempotency_key.as_deref())
            .bind(call.request_digest.as_deref())
            .bind_now()
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Inserted { row, created: true, owner })
        }

        async fn claim_broker_calls(
            &self,
            broker: BrokerId,
            session: SessionId,
            claimer: ReplicaId,
            limit: u32,
        ) -> StoreResult<Vec<DispatchIntent>> {
            // Every drain pass asks; almost always there is nothing. A read
            // answers that without taking SQLite's write lock.
            let any: Option<i32> = sqlx::query_scalar(sql!(
                "SELECT 1 FROM dispatch_intents
                 WHERE broker_id = $1 AND agent_id IS NULL AND state = {pending} LIMIT 1",
                pending = INTENT.pending,
            ))
            .bind(broker)
            .fetch_optional(&self.pool)
            .await?;
            if any.is_none() {
                return Ok(Vec::new());
            }
            let mut tx = self.write().await?;
            let rows = sqlx::query_as(sql!(
                "UPDATE dispatch_intents
                 SET state = {in_flight}, claimed_by = $3, claimed_at = @now,
                     attempts = attempts + 1, updated_at = @now
                 WHERE state = {pending} AND id IN (
                     SELECT i.id FROM dispatch_intents i
                     WHERE i.agent_id IS NULL AND i.state = {pending} AND i.broker_id = $1
                       AND EXISTS (SELECT 1 FROM brokers b WHERE b.id = $1 AND b.session_id = $2)
                     ORDER BY i.created_at LIMIT $4)
                 RETURNING *",
                in_flight = INTENT.in_flight,
                pending = INTENT.pending,
            ))
            .bind(broker)
            .bind(session)
            .bind(claimer)
            .bind(i64::from(limit))
            .bind_now()
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(rows)
        }

        async fn cancel_intent(
            &self,
            id: IntentId,
        ) -> StoreResult<(DispatchIntent, CancelOutcome)> {
            let cancelled: Option<DispatchIntent> = sqlx::query_as(sql!(
                "UPDATE dispatch_intents SET state = {cancelled}, updated_at = @now
                 WHERE id = $1 AND state = {pending} RETURNING *",
                cancelled = INTENT.cancelled,
                pending = INTENT.pending,
            ))
            .bind(id)
            .bind_now()
            .fetch_optional(&self.pool)
            .await?;
            match cancelled {
                Some(row) => Ok((row, CancelOutcome::Cancelled)),
                None => {
                    let row = self.intent(id).await?;
                    let before = row.state == IntentState::Cancelled;
                    Ok((row, cancel_outcome(before)))
                }
            }
        }

        async fn cancel_message(&self, id: MessageId) -> StoreResult<(Message, CancelOutcome)> {
            let cancelled: Option<Message> = sqlx::query_as(sql!(
                "UPDATE messages SET state = {cancelled}, updated_at = @now
                 WHERE id = $1 AND state = {pending} RETURNING *",
                cancelled = MESSAGE.cancelled,
                pending = MESSAGE.pending,
            ))
            .bind(id)
            .bind_now()
            .fetch_optional(&self.pool)
            .await?;
            match cancelled {
                Some(row) => Ok((row, CancelOutcome::Cancelled)),
                None => {
                    let row = self.message(id).await?;
                    let before = row.state == MessageState::Cancelled;
                    Ok((row, cancel_outcome(before)))
                }
            }
        }

        async fn insert_broadcast(&self, b: NewBroadcast) -> StoreResult<Broadcast> {
            let mut tx = self.write().await?;
            if let Some(key) = b.idempotency_key.as_deref() {
                let existing: Option<(BroadcastId, Option<String>)> = sqlx::query_as(sql!(
                    "SELECT id, request_digest FROM broadcasts WHERE idempotency_key = $1"
                ))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((id, digest)) = existing {
                    if digest != b.request_digest {
                        return Err(StoreError::Conflict(Conflict::KeyReused(key.to_owned())));
                    }
                    let rows: Vec<Message> = sqlx::query_as(sql!(
                        "SELECT * FROM messages WHERE broadcast_id = $1 ORDER BY agent_id"
                    ))
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await?;
                    let messages = rows
                        .into_iter()
                        .map(|row| Inserted { row, created: false, owner: None })
                        .collect();
                    return Ok(Broadcast { id, created: false, messages });
                }
            }
            sqlx::query(sql!(
                "INSERT INTO broadcasts (id, idempotency_key, request_digest, created_at)
                 VALUES ($1, $2, $3, @now)"
            ))
            .bind(b.id)
            .bind(b.idempotency_key.as_deref())
            .bind(b.request_digest.as_deref())
            .bind_now()
            .execute(&mut *tx)
            .await?;
            let (broker, labels) = match &b.target {
                Target::Broker(id) => (Some(*id), None),
                Target::Labels(labels) => (None, Some(Json(labels))),
            };
            let limit = i64::try_from(MAX_BROADCAST_AGENTS + 1).unwrap_or(i64::MAX);
            let agents: Vec<(AgentId, BrokerId)> = sqlx::query_as(sql!(
                "SELECT id, broker_id FROM agents
                 WHERE phase <> {deleted} AND ($1 IS NULL OR broker_id = $1)
                   AND ($2 IS NULL OR @labels_contain($2))
                 ORDER BY id LIMIT $3 @for_update",
                deleted = *DELETED
            ))
            .bind(broker)
            .bind(labels)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            if agents.len() > MAX_BROADCAST_AGENTS {
                return Err(StoreError::Invalid(Invalid::TooManyAgents));
            }
            // Each broker's owner, read under the lock `claim_affinity`
            // waits for (see `Inserted::owner`).
            let mut owners: HashMap<BrokerId, Option<ReplicaId>> = HashMap::new();
            let mut messages = Vec::with_capacity(agents.len());
            for (agent, broker) in agents {
                let owner = match owners.get(&broker) {
                    Some(owner) => *owner,
                    None => {
                        let owner: Option<ReplicaId> = sqlx::query_scalar(sql!(
                            "SELECT connected_replica FROM brokers WHERE id = $1 @for_key_share"
                        ))
                        .bind(broker)
                        .fetch_one(&mut *tx)
                        .await?;
                        owners.insert(broker, owner);
                        owner
                    }
                };
                let (seq, ord): (i64, i64) = sqlx::query_as(sql!(
                    "UPDATE agents SET message_seq = message_seq + 1, work_seq = work_seq + 1
                     WHERE id = $1 RETURNING message_seq, work_seq"
                ))
                .bind(agent)
                .fetch_one(&mut *tx)
                .await?;
                let row: Message = sqlx::query_as(sql!(
                    "INSERT INTO messages
                         (id, agent_id, broker_id, seq, ord, body, expires_at, broadcast_id,
                          deliver_after, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, @now, @now) RETURNING *"
                ))
                .bind(MessageId::new())
                .bind(agent)
                .bind(broker)
                .bind(seq)
                .bind(ord)
                .bind(Json(&b.body))
                .bind(b.expires_at)
                .bind(b.id)
                .bind(b.deliver_after)
                .bind_now()
                .fetch_one(&mut *tx)
                .await?;
                messages.push(Inserted { row, created: true, owner });
            }
            tx.commit().await?;
            Ok(Broadcast { id: b.id, created: true, messages })
        }

        async fn has_pending_messages(&self, agent: AgentId) -> StoreResult<bool> {
            Ok(sqlx::query_scalar::<_, i32>(sql!(
                "SELECT 1 FROM messages WHERE agent_id = $1 AND state = {pending} LIMIT 1",
                pending = MESSAGE.pending,
            ))
            .bind(agent)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
        }

        async fn expire_messages(&self) -> StoreResult<Vec<MessageRef>> {
            Ok(sqlx::query_as(sql!(
                "UPDATE messages SET state = {expired}, updated_at = @now
                 WHERE state IN {unfinished} AND expires_at < @now
                 RETURNING id, agent_id, broker_id",
                expired = *EXPIRED,
                unfinished = MESSAGE.unfinished,
            ))
            .bind_now()
            .fetch_all(&self.pool)
            .await?)
        }

        async fn requeue_broker_in_flight(
            &self,
            broker: BrokerId,
            dead_letter_after: Option<i32>,
        ) -> StoreResult<RequeueReport> {
            self.requeue_in_flight(broker, dead_letter_after, true).await
        }

        async fn requeue_unacknowledged(
            &self,
            broker: BrokerId,
            max_attempts: i32,
        ) -> StoreResult<RequeueReport> {
            self.requeue_in_flight(broker, Some(max_attempts), false).await
        }

        async fn receive(&self, broker: BrokerId, ids: &[uuid::Uuid]) -> StoreResult<Vec<uuid::Uuid>> {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let known: std::collections::HashSet<uuid::Uuid> =
                self.receive_rows(broker, ids).await?.into_iter().collect();
            Ok(ids.iter().filter(|id| !known.contains(id)).copied().collect())
        }

        async fn unclaim(
            &self,
            broker: BrokerId,
            intents: &[IntentId],
            messages: &[MessageId],
        ) -> StoreResult<()> {
            let mut tx = self.write().await?;
            for &id in intents {
                sqlx::query(sql!(
                    "UPDATE dispatch_intents SET {uncounted}, updated_at = @now
                     WHERE id = $1 AND broker_id = $2 AND state = {in_flight}",
                    uncounted = INTENT.uncounted_requeue_set(),
                    in_flight = INTENT.in_flight,
                ))
                .bind(id)
                .bind(broker)
                .bind_now()
                .execute(&mut *tx)
                .await?;
            }
            for &id in messages {
                sqlx::query(sql!(
                    "UPDATE messages SET {uncounted}, updated_at = @now
                     WHERE id = $1 AND broker_id = $2 AND state = {in_flight}",
                    uncounted = MESSAGE.uncounted_requeue_set(),
                    in_flight = MESSAGE.in_flight,
                ))
                .bind(id)
                .bind(broker)
                .bind_now()
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        }
    }

    impl Backend {
        /// [`WorkStore::requeue_broker_in_flight`] for every row in flight
        /// or, unless `all`, only the rows in flight the broker has not
        /// said it received since their claim (migration 0013).
        async fn requeue_in_flight(
            &self,
            broker: BrokerId,
            dead_letter_after: Option<i32>,
            all: bool,
        ) -> StoreResult<RequeueReport> {
            let mut tx = self.write().await?;
            let (mut intents, mut messages): (Vec<Requeued<IntentId>>, Vec<Requeued<MessageId>>) =
                (Vec::new(), Vec::new());
            // Per agent, the oldest row in flight is the one the broker was
            // handling when its session ended: its claim counts, and at
            // `max_attempts` it fails.
            if let Some(max_attempts) = dead_letter_after {
                intents = sqlx::query_as(sql!(
                    "UPDATE dispatch_intents SET {requeue}, updated_at = @now
                     WHERE broker_id = $1 AND state = {in_flight}
                       AND ($3 OR received_at IS NULL OR received_at < claimed_at)
                       AND NOT EXISTS (SELECT 1 FROM dispatch_intents o
                                       WHERE o.agent_id = dispatch_intents.agent_id
                                         AND o.state = {in_flight}
                                         AND ($3 OR o.received_at IS NULL
                                              OR o.received_at < o.claimed_at)
                                         AND o.seq < dispatch_intents.seq)
                     RETURNING id, agent_id, broker_id, state",
                    requeue = INTENT.requeue_set("$2", SESSION_ENDED),
                    in_flight = INTENT.in_flight,
                ))
                .bind(broker)
                .bind(max_attempts)
                .bind(all)
                .bind_now()
                .fetch_all(&mut *tx)
                .await?;
                messages = sqlx::query_as(sql!(
                    "UPDATE messages SET {requeue}, updated_at = @now
                     WHERE broker_id = $1 AND state = {in_flight}
                       AND ($3 OR received_at IS NULL OR received_at < claimed_at)
                       AND NOT EXISTS (SELECT 1 FROM messages o
                                       WHERE o.agent_id = messages.agent_id
                                         AND o.state = {in_flight}
                                         AND ($3 OR o.received_at IS NULL
                                              OR o.received_at < o.claimed_at)
                                         AND o.seq < messages.seq)
                     RETURNING id, agent_id, broker_id, state",
                    requeue = MESSAGE.requeue_set("$2", SESSION_ENDED),
                    in_flight = MESSAGE.in_flight,
                ))
                .bind(broker)
                .bind(max_attempts)
                .bind(all)
                .bind_now()
                .fetch_all(&mut *tx)
                .await?;
            }
            // The rest were never reached (or the session did not end by
            // itself): their claims do not count.
            let intents_behind = sqlx::query(sql!(
                "UPDATE dispatch_intents SET {uncounted}, updated_at = @now
                 WHERE broker_id = $1 AND state = {in_flight}
                   AND ($2 OR received_at IS NULL OR received_at < claimed_at)",
                uncounted = INTENT.uncounted_requeue_set(),
                in_flight = INTENT.in_flight,
            ))
            .bind(broker)
            .bind(all)
            .bind_now()
            .execute(&mut *tx)
            .await?;
            let messages_behind = sqlx::query(sql!(
                "UPDATE messages SET {uncounted}, updated_at = @now
                 WHERE broker_id = $1 AND state = {in_flight}
                   AND ($2 OR received_at IS NULL OR received_at < claimed_at)",
                uncounted = MESSAGE.uncounted_requeue_set(),
                in_flight = MESSAGE.in_flight,
            ))
            .bind(broker)
            .bind(all)
            .bind_now()
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            let mut report = RequeueReport::counted(&intents, &messages);
            report.intents_requeued += intents_behind.rows_affected();
            report.messages_requeued += messages_behind.rows_affected();
            Ok(report)
        }
    }
}

/// What a cancel that changed nothing found: a row cancelled before, or
/// one sent or finished.
fn cancel_outcome(cancelled_before: bool) -> CancelOutcome {
    if cancelled_before {
        CancelOutcome::AlreadyCancelled
    } else {
        CancelOutcome::NotPending
    }
}
