//! The SQLite work statements: inside one write transaction, a batch is
//! inserted row by row, a claim is one update over the claimable rows, and
//! an ack checks each id.

use chrono::Utc;
use sqlx::types::Json;
use sqlx::{QueryBuilder, Sqlite, Transaction};

use crate::batch::replay;
use crate::error::{Entity, StoreError, StoreResult};
use crate::ids::{AgentId, BrokerId, MessageId, ReplicaId, SessionId};
use crate::model::{
    Acked, DispatchIntent, Inserted, Message, MessageRef, MessageState, NewIntent, NewMessage,
};
use crate::rules::{DELETED, DELIVERED, INTENT, MESSAGE, WorkStates};
use crate::sqlite::SqliteStore;
use crate::store::WorkDialect;

/// `UPDATE <table> ... WHERE id IN (pending rows of these brokers, per-agent
/// order, not behind another claimer's in-flight row) RETURNING *`.
fn claim_query(
    (table, states): (&str, &WorkStates),
    (other, other_states): (&str, &WorkStates),
    sessions: &[(BrokerId, SessionId)],
    claimer: ReplicaId,
    limit: u32,
    timed: bool,
) -> QueryBuilder<Sqlite> {
    let (pending, in_flight) = (states.pending, states.in_flight);
    let now = Utc::now();
    let mut q = QueryBuilder::new(format!(
        "UPDATE {table} SET state = {in_flight}, claimed_by = "
    ));
    q.push_bind(claimer)
        .push(", claimed_at = ")
        .push_bind(now)
        .push(", attempts = attempts + 1, updated_at = ")
        .push_bind(now)
        .push(format!(
            " WHERE id IN (SELECT r.id FROM {table} r WHERE r.state = {pending} \
             AND r.agent_id IS NOT NULL \
             AND r.broker_id IN (SELECT b.id FROM brokers b WHERE "
        ));
    // Only brokers whose live session is the claimer's (see the trait).
    for (i, (broker, session)) in sessions.iter().enumerate() {
        if i > 0 {
            q.push(" OR ");
        }
        q.push("(b.id = ")
            .push_bind(*broker)
            .push(" AND b.session_id = ")
            .push_bind(*session)
            .push(")");
    }
    q.push(format!(
        ") AND NOT EXISTS (SELECT 1 FROM {other} x WHERE x.agent_id = r.agent_id \
         AND x.state = {other_pending} AND x.ord < r.ord",
        other_pending = other_states.pending,
    ));
    if !timed {
        // The other table is messages: an expired one holds back nothing.
        q.push(" AND x.expires_at > ").push_bind(now);
    }
    q.push(format!(
        ") AND NOT EXISTS (SELECT 1 FROM {other} x WHERE x.agent_id = r.agent_id \
         AND x.state = {other_in_flight} AND x.ord < r.ord) \
         AND NOT EXISTS (SELECT 1 FROM {table} o WHERE o.agent_id = r.agent_id \
         AND o.state = {in_flight} AND o.claimed_by IS NOT ",
        // One probe per state, each matching a partial index's predicate.
        other_in_flight = other_states.in_flight,
    ))
    .push_bind(claimer)
    .push(")");
    if timed {
        // Messages: an expired one is never claimed, and one not due yet
        // holds back its agent's later ones (see the PostgreSQL claim).
        q.push(" AND r.expires_at > ")
            .push_bind(now)
            .push(format!(
                " AND NOT EXISTS (SELECT 1 FROM {table} d WHERE d.agent_id = r.agent_id \
                 AND d.state = {pending} AND d.deliver_after IS NOT NULL AND d.seq <= r.seq \
                 AND d.deliver_after > "
            ))
            .push_bind(now)
            .push(")");
    }
    q.push(" ORDER BY r.agent_id, r.seq LIMIT ")
        .push_bind(i64::from(limit))
        .push(") RETURNING *");
    q
}

/// Runs a [`claim_query`] of `tables` (the claimed one, then the other
/// one) in one write transaction.
async fn claim<R>(
    store: &SqliteStore,
    (this, other): ((&str, &WorkStates), (&str, &WorkStates)),
    sessions: &[(BrokerId, SessionId)],
    claimer: ReplicaId,
    limit: u32,
) -> StoreResult<Vec<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
{
    let mut tx = store.write().await?;
    let timed = this.0 == "messages";
    let mut q = claim_query(this, other, sessions, claimer, limit, timed);
    let rows = q.build_query_as().fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(rows)
}

/// Takes the agent's next sequence number from `counter` and its next
/// place in the agent's one order (`work_seq`), refusing a missing or
/// deleted agent, and answers with the agent's broker and the replica
/// owning its session (read in the same write transaction, so no
/// session can be claimed before this row commits; see
/// [`Inserted::owner`]).
async fn next_seq(
    tx: &mut Transaction<'static, Sqlite>,
    agent: AgentId,
    counter: &str,
) -> StoreResult<(BrokerId, i64, i64, Option<ReplicaId>)> {
    let sql = format!(
        "UPDATE agents SET {counter} = {counter} + 1, work_seq = work_seq + 1
         WHERE id = $1 AND phase <> {deleted}
         RETURNING broker_id, {counter}, work_seq,
                   (SELECT connected_replica FROM brokers WHERE brokers.id = agents.broker_id)",
        deleted = *DELETED
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(agent)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound(Entity::Agent))
}

/// The row an idempotency key names, if any.
async fn by_key<R>(
    tx: &mut Transaction<'static, Sqlite>,
    table: &str,
    key: Option<&str>,
) -> StoreResult<Option<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
{
    let Some(key) = key else { return Ok(None) };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT * FROM {table} WHERE idempotency_key = $1"
    )))
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?)
}

impl WorkDialect for SqliteStore {
    async fn insert_intent_batch(
        &self,
        intents: Vec<NewIntent>,
    ) -> StoreResult<Vec<Inserted<DispatchIntent>>> {
        let mut tx = self.write().await?;
        let mut rows = Vec::with_capacity(intents.len());
        for i in intents {
            let key = i.idempotency_key.as_deref();
            if let Some(existing) = by_key(&mut tx, "dispatch_intents", key).await? {
                // A refusal drops the transaction: nothing is written.
                rows.push(replay(&i, existing)?);
                continue;
            }
            let (broker, seq, ord, owner) = next_seq(&mut tx, i.agent_id, "intent_seq").await?;
            let row: DispatchIntent = sqlx::query_as(
                "INSERT INTO dispatch_intents
                     (id, broker_id, agent_id, seq, op, args, deadline, idempotency_key,
                      request_digest, created_at, updated_at, ord, name)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12) RETURNING *",
            )
            .bind(i.id)
            .bind(broker)
            .bind(i.agent_id)
            .bind(seq)
            .bind(i.op.as_str())
            .bind(Json(i.args))
            .bind(i.deadline)
            .bind(i.idempotency_key)
            .bind(i.request_digest)
            .bind(Utc::now())
            .bind(ord)
            .bind(i.name)
            .fetch_one(&mut *tx)
            .await?;
            rows.push(Inserted {
                row,
                created: true,
                owner,
            });
        }
        tx.commit().await?;
        Ok(rows)
    }

    async fn insert_message_batch(
        &self,
        messages: Vec<NewMessage>,
    ) -> StoreResult<Vec<Inserted<Message>>> {
        let mut tx = self.write().await?;
        let mut rows = Vec::with_capacity(messages.len());
        for m in messages {
            let key = m.idempotency_key.as_deref();
            if let Some(existing) = by_key(&mut tx, "messages", key).await? {
                // A refusal drops the transaction: nothing is written.
                rows.push(replay(&m, existing)?);
                continue;
            }
            let (broker, seq, ord, owner) = next_seq(&mut tx, m.agent_id, "message_seq").await?;
            let row: Message = sqlx::query_as(
                "INSERT INTO messages
                     (id, agent_id, broker_id, seq, body, expires_at, idempotency_key,
                      request_digest, created_at, updated_at, ord, deliver_after)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11) RETURNING *",
            )
            .bind(m.id)
            .bind(m.agent_id)
            .bind(broker)
            .bind(seq)
            .bind(Json(m.body))
            .bind(m.expires_at)
            .bind(m.idempotency_key)
            .bind(m.request_digest)
            .bind(Utc::now())
            .bind(ord)
            .bind(m.deliver_after)
            .fetch_one(&mut *tx)
            .await?;
            rows.push(Inserted {
                row,
                created: true,
                owner,
            });
        }
        tx.commit().await?;
        Ok(rows)
    }

    async fn claim_intent_rows(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<DispatchIntent>> {
        let tables = (("dispatch_intents", &*INTENT), ("messages", &*MESSAGE));
        claim(self, tables, sessions, claimer, limit).await
    }

    async fn claim_message_rows(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        let tables = (("messages", &*MESSAGE), ("dispatch_intents", &*INTENT));
        claim(self, tables, sessions, claimer, limit).await
    }

    async fn receive_rows(
        &self,
        broker: BrokerId,
        ids: &[uuid::Uuid],
    ) -> StoreResult<Vec<uuid::Uuid>> {
        let mut known = Vec::new();
        let now = Utc::now();
        let mut tx = self.write().await?;
        for &id in ids {
            for (table, states) in [("dispatch_intents", &*INTENT), ("messages", &*MESSAGE)] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {table} SET received_at = $3
                     WHERE id = $1 AND broker_id = $2 AND state = {in_flight}",
                    in_flight = states.in_flight,
                )))
                .bind(id)
                .bind(broker)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let ours: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT 1 FROM {table} WHERE id = $1 AND broker_id = $2"
                )))
                .bind(id)
                .bind(broker)
                .fetch_optional(&mut *tx)
                .await?;
                if ours.is_some() {
                    known.push(id);
                    break;
                }
            }
        }
        tx.commit().await?;
        Ok(known)
    }

    async fn deliver(&self, broker: BrokerId, ids: &[MessageId]) -> StoreResult<Acked> {
        let mut acked = Acked::default();
        let mut tx = self.write().await?;
        let now = Utc::now();
        for id in ids {
            let owner: Option<(BrokerId, AgentId, String, chrono::DateTime<Utc>)> = sqlx::query_as(
                "SELECT broker_id, agent_id, state, created_at FROM messages WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            match owner {
                Some((owner, agent_id, state, created_at)) if owner == broker => {
                    let unfinished = state.parse().is_ok_and(|s| {
                        matches!(s, MessageState::Pending | MessageState::Dispatched)
                    });
                    if unfinished {
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "UPDATE messages SET state = {delivered}, delivered_at = $2,
                                    updated_at = $2
                             WHERE id = $1",
                            delivered = *DELIVERED
                        )))
                        .bind(id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        acked.delivered += 1;
                        acked.messages.push(MessageRef {
                            id: *id,
                            agent_id,
                            broker_id: broker,
                        });
                        acked
                            .waited
                            .push((now - created_at).to_std().unwrap_or_default());
                    }
                }
                _ => acked.not_found.push(*id),
            }
        }
        tx.commit().await?;
        Ok(acked)
    }
}
