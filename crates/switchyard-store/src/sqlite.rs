//! [`Store`] on an embedded SQLite file: the single-node backend.
//!
//! Every writing transaction starts with `BEGIN IMMEDIATE`, which takes
//! SQLite's one write lock up front. Writers are therefore serialized, which
//! is what makes claims exactly-once here (and avoids the `SQLITE_BUSY` a
//! deferred transaction gets when it upgrades from reading to writing).
//! Time comes from this process's clock: there is only one replica.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Sqlite, SqlitePool, Transaction};

use crate::batch::check_batch;
use crate::error::{StoreError, StoreResult};
use crate::ids::{AgentId, BrokerId, IntentId, MessageId, ReplicaId, SessionId};
use crate::model::{
    Acked, Affinity, Agent, Broker, DispatchIntent, Inserted, IntentFilter, IntentOutcome,
    IntentState, Message, MessageState, NewAgent, NewIntent, NewMessage, Phase, Replica,
    RequeuePolicy, RequeueReport, SessionHeartbeat,
};
use crate::store::{Singleton, Store};

/// SQLite implementation of [`Store`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Wraps a pool whose database is already migrated.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    async fn write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn ago(d: Duration) -> DateTime<Utc> {
    now() - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// `UPDATE <table> ... WHERE id IN (pending rows of these brokers, per-agent
/// order, not behind another claimer's in-flight row) RETURNING *`.
fn claim_query(
    table: &str,
    claimed_state: &str,
    sessions: &[(BrokerId, SessionId)],
    claimer: ReplicaId,
    limit: u32,
) -> QueryBuilder<Sqlite> {
    let mut q = QueryBuilder::new(format!(
        "UPDATE {table} SET state = '{claimed_state}', claimed_by = "
    ));
    q.push_bind(claimer)
        .push(", claimed_at = ")
        .push_bind(now())
        .push(", attempts = attempts + 1, updated_at = ")
        .push_bind(now())
        .push(format!(
            " WHERE id IN (SELECT r.id FROM {table} r WHERE r.state = 'pending' \
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
        ") AND NOT EXISTS (SELECT 1 FROM {table} o WHERE o.agent_id = r.agent_id \
         AND o.state = '{claimed_state}' AND o.claimed_by IS NOT "
    ))
    .push_bind(claimer)
    .push(") ORDER BY r.agent_id, r.seq LIMIT ")
    .push_bind(i64::from(limit))
    .push(") RETURNING *");
    q
}

/// Takes the agent's next sequence number from the counter `sql` bumps
/// (refusing a missing or deleted agent), and answers with the agent's
/// broker and the replica holding its session (read in the same write
/// transaction, so no session can be claimed before this row commits; see
/// [`Inserted::holder`]).
async fn next_seq(
    tx: &mut Transaction<'static, Sqlite>,
    agent: AgentId,
    sql: &'static str,
) -> StoreResult<(BrokerId, i64, Option<ReplicaId>)> {
    sqlx::query_as(sql)
        .bind(agent)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound("agent"))
}

const NEXT_MESSAGE_SEQ: &str = "UPDATE agents SET message_seq = message_seq + 1
     WHERE id = ?1 AND phase <> 'deleted'
     RETURNING broker_id, message_seq,
               (SELECT connected_replica FROM brokers WHERE brokers.id = agents.broker_id)";
const NEXT_INTENT_SEQ: &str = "UPDATE agents SET intent_seq = intent_seq + 1
     WHERE id = ?1 AND phase <> 'deleted'
     RETURNING broker_id, intent_seq,
               (SELECT connected_replica FROM brokers WHERE brokers.id = agents.broker_id)";

async fn release_all(
    tx: &mut Transaction<'static, Sqlite>,
    replica: ReplicaId,
) -> StoreResult<Vec<BrokerId>> {
    Ok(sqlx::query_scalar(
        "UPDATE brokers SET status = 'offline', connected_replica = NULL, session_id = NULL,
                connected_at = NULL, updated_at = ?2
         WHERE connected_replica = ?1
         RETURNING id",
    )
    .bind(replica)
    .bind(now())
    .fetch_all(&mut **tx)
    .await?)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn register_replica(&self, id: ReplicaId, address: &str) -> StoreResult<Replica> {
        Ok(sqlx::query_as(
            "INSERT INTO replicas (instance_id, address, started_at, last_seen) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (instance_id) DO UPDATE SET address = excluded.address, last_seen = ?3
             RETURNING *",
        )
        .bind(id)
        .bind(address)
        .bind(now())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn heartbeat_replica(&self, id: ReplicaId) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE replicas SET last_seen = ?2 WHERE instance_id = ?1")
            .bind(id)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn live_replicas(&self, stale_after: Duration) -> StoreResult<Vec<Replica>> {
        Ok(sqlx::query_as(
            "SELECT * FROM replicas WHERE last_seen >= ?1 ORDER BY started_at, instance_id",
        )
        .bind(ago(stale_after))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn reap_dead_replicas(&self, stale_after: Duration) -> StoreResult<Vec<ReplicaId>> {
        let mut tx = self.write().await?;
        let dead: Vec<ReplicaId> =
            sqlx::query_scalar("DELETE FROM replicas WHERE last_seen < ?1 RETURNING instance_id")
                .bind(ago(stale_after))
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query(
            "UPDATE brokers SET status = 'offline', connected_replica = NULL, session_id = NULL,
                    connected_at = NULL, updated_at = ?1
             WHERE connected_replica IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.instance_id = connected_replica)",
        )
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(dead)
    }

    async fn deregister_replica(&self, id: ReplicaId) -> StoreResult<Vec<BrokerId>> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM replicas WHERE instance_id = ?1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let released = release_all(&mut tx, id).await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn create_broker(
        &self,
        id: BrokerId,
        name: &str,
        secret_hash: &str,
    ) -> StoreResult<Broker> {
        sqlx::query_as(
            "INSERT INTO brokers (id, name, secret_hash, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?4) RETURNING *",
        )
        .bind(id)
        .bind(name)
        .bind(secret_hash)
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("a broker named {name:?} exists already"))
            }
            other => other,
        })
    }

    async fn broker(&self, id: BrokerId) -> StoreResult<Broker> {
        sqlx::query_as("SELECT * FROM brokers WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("broker"))
    }

    async fn broker_by_name(&self, name: &str) -> StoreResult<Broker> {
        sqlx::query_as("SELECT * FROM brokers WHERE name = ?1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("broker"))
    }

    async fn list_brokers(&self) -> StoreResult<Vec<Broker>> {
        Ok(sqlx::query_as("SELECT * FROM brokers ORDER BY name")
            .fetch_all(&self.pool)
            .await?)
    }

    async fn delete_broker(&self, id: BrokerId) -> StoreResult<()> {
        let mut tx = self.write().await?;
        let found: Option<Option<uuid::Uuid>> =
            sqlx::query_scalar("SELECT session_id FROM brokers WHERE id = ?1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        match found {
            None => return Err(StoreError::NotFound("broker")),
            Some(Some(_)) => {
                return Err(StoreError::Conflict(
                    "broker is connected; stop its daemon first".into(),
                ));
            }
            Some(None) => {}
        }
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM agents WHERE broker_id = ?1 AND phase <> 'deleted'",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "broker still has {live} agent(s); delete them first"
            )));
        }
        for sql in [
            "DELETE FROM messages WHERE broker_id = ?1",
            "DELETE FROM dispatch_intents WHERE broker_id = ?1",
            "DELETE FROM agents WHERE broker_id = ?1",
            "DELETE FROM brokers WHERE id = ?1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_affinity(
        &self,
        broker: BrokerId,
        replica: ReplicaId,
        session: SessionId,
    ) -> StoreResult<Option<Affinity>> {
        let mut tx = self.write().await?;
        let previous: Broker = sqlx::query_as("SELECT * FROM brokers WHERE id = ?1")
            .bind(broker)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("broker"))?;
        sqlx::query(
            "UPDATE brokers SET status = 'online', connected_replica = ?2, session_id = ?3,
                    connected_at = ?4, last_heartbeat = ?4, updated_at = ?4
             WHERE id = ?1",
        )
        .bind(broker)
        .bind(replica)
        .bind(session)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(previous.affinity())
    }

    async fn release_affinity(
        &self,
        broker: BrokerId,
        replica: ReplicaId,
        session: SessionId,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE brokers SET status = 'offline', connected_replica = NULL, session_id = NULL,
                    connected_at = NULL, updated_at = ?4
             WHERE id = ?1 AND connected_replica = ?2 AND session_id = ?3",
        )
        .bind(broker)
        .bind(replica)
        .bind(session)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn heartbeat_session(
        &self,
        broker: BrokerId,
        session: SessionId,
    ) -> StoreResult<SessionHeartbeat> {
        let done =
            sqlx::query("UPDATE brokers SET last_heartbeat = ?3 WHERE id = ?1 AND session_id = ?2")
                .bind(broker)
                .bind(session)
                .bind(now())
                .execute(&self.pool)
                .await?;
        Ok(if done.rows_affected() == 1 {
            SessionHeartbeat::Current
        } else {
            SessionHeartbeat::Superseded
        })
    }

    async fn release_replica_affinities(&self, replica: ReplicaId) -> StoreResult<Vec<BrokerId>> {
        let mut tx = self.write().await?;
        let released = release_all(&mut tx, replica).await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn create_agent(&self, agent: NewAgent) -> StoreResult<Agent> {
        let NewAgent {
            id,
            name,
            broker_id,
            command,
            env,
        } = agent;
        if command.is_empty() {
            return Err(StoreError::Invalid("command must not be empty".into()));
        }
        sqlx::query_as(
            "INSERT INTO agents (id, name, broker_id, command, env, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) RETURNING *",
        )
        .bind(id)
        .bind(&name)
        .bind(broker_id)
        .bind(Json(command))
        .bind(Json(env))
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("an agent named {name:?} exists already"))
            }
            StoreError::Invalid(_) => StoreError::NotFound("broker"),
            other => other,
        })
    }

    async fn agent(&self, id: AgentId) -> StoreResult<Agent> {
        sqlx::query_as("SELECT * FROM agents WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("agent"))
    }

    async fn agent_by_name(&self, name: &str) -> StoreResult<Agent> {
        sqlx::query_as("SELECT * FROM agents WHERE name = ?1 AND phase <> 'deleted'")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("agent"))
    }

    async fn list_agents(&self, broker: Option<BrokerId>) -> StoreResult<Vec<Agent>> {
        Ok(sqlx::query_as(
            "SELECT * FROM agents WHERE ?1 IS NULL OR broker_id = ?1 ORDER BY name, created_at",
        )
        .bind(broker)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn apply_agent_status(
        &self,
        broker: BrokerId,
        agent: AgentId,
        phase: Phase,
        status_seq: i64,
    ) -> StoreResult<(Agent, bool)> {
        let applied: Option<Agent> = sqlx::query_as(
            "UPDATE agents SET phase = ?3, status_seq = ?4, updated_at = ?5
             WHERE id = ?1 AND broker_id = ?2 AND status_seq < ?4 AND phase <> 'deleted'
             RETURNING *",
        )
        .bind(agent)
        .bind(broker)
        .bind(phase.as_str())
        .bind(status_seq)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = applied {
            return Ok((row, true));
        }
        let current = self.agent(agent).await?;
        if current.broker_id != broker {
            return Err(StoreError::NotFound("agent"));
        }
        Ok((current, false))
    }

    async fn mark_agent_deleted(&self, id: AgentId) -> StoreResult<Agent> {
        sqlx::query_as(
            "UPDATE agents SET phase = 'deleted',
                    updated_at = CASE WHEN phase = 'deleted' THEN updated_at ELSE ?2 END
             WHERE id = ?1 RETURNING *",
        )
        .bind(id)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound("agent"))
    }

    async fn insert_intents(
        &self,
        intents: Vec<NewIntent>,
    ) -> StoreResult<Vec<Inserted<DispatchIntent>>> {
        check_batch(
            intents.iter().map(|i| i.idempotency_key.as_deref()),
            intents.len(),
        )?;
        let mut tx = self.write().await?;
        let mut rows = Vec::with_capacity(intents.len());
        for i in intents {
            if let Some(existing) = intent_by_key(&mut tx, i.idempotency_key.as_deref()).await? {
                rows.push(Inserted {
                    row: existing,
                    created: false,
                    holder: None,
                });
                continue;
            }
            let (broker, seq, holder) = next_seq(&mut tx, i.agent_id, NEXT_INTENT_SEQ).await?;
            let row: DispatchIntent = sqlx::query_as(
                "INSERT INTO dispatch_intents
                     (id, broker_id, agent_id, seq, op, args, deadline, idempotency_key,
                      created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9) RETURNING *",
            )
            .bind(i.id)
            .bind(broker)
            .bind(i.agent_id)
            .bind(seq)
            .bind(i.op.as_str())
            .bind(Json(i.args))
            .bind(i.deadline)
            .bind(i.idempotency_key)
            .bind(now())
            .fetch_one(&mut *tx)
            .await?;
            rows.push(Inserted {
                row,
                created: true,
                holder,
            });
        }
        tx.commit().await?;
        Ok(rows)
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
        let mut tx = self.write().await?;
        let mut q = claim_query("dispatch_intents", "in_progress", sessions, claimer, limit);
        let mut rows: Vec<DispatchIntent> = q.build_query_as().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.sort_by_key(|r| (r.agent_id, r.seq));
        Ok(rows)
    }

    async fn finish_intent(&self, id: IntentId, outcome: IntentOutcome) -> StoreResult<bool> {
        let (state, result, error) = match outcome {
            IntentOutcome::Done(result) => (IntentState::Done, Some(Json(result)), None),
            IntentOutcome::Failed(error) => (IntentState::Failed, None, Some(error)),
        };
        let done = sqlx::query(
            "UPDATE dispatch_intents SET state = ?2, result = ?3, error = ?4, updated_at = ?5
             WHERE id = ?1 AND state IN ('pending', 'in_progress')",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(result)
        .bind(error)
        .bind(now())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        self.intent(id).await.map(|_| false)
    }

    async fn intent(&self, id: IntentId) -> StoreResult<DispatchIntent> {
        sqlx::query_as("SELECT * FROM dispatch_intents WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("dispatch"))
    }

    async fn intent_by_key(&self, key: &str) -> StoreResult<Option<DispatchIntent>> {
        Ok(
            sqlx::query_as("SELECT * FROM dispatch_intents WHERE idempotency_key = ?1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn list_intents(&self, filter: IntentFilter) -> StoreResult<Vec<DispatchIntent>> {
        Ok(sqlx::query_as(
            "SELECT * FROM dispatch_intents
             WHERE (?1 IS NULL OR broker_id = ?1) AND (?2 IS NULL OR state = ?2)
             ORDER BY created_at DESC, seq DESC LIMIT ?3",
        )
        .bind(filter.broker_id)
        .bind(filter.state.map(IntentState::as_str))
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn expire_intents(&self) -> StoreResult<Vec<IntentId>> {
        Ok(sqlx::query_scalar(
            "UPDATE dispatch_intents SET state = 'failed', error = 'deadline exceeded',
                    updated_at = ?1
             WHERE state IN ('pending', 'in_progress') AND deadline < ?1
             RETURNING id",
        )
        .bind(now())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn insert_messages(
        &self,
        messages: Vec<NewMessage>,
    ) -> StoreResult<Vec<Inserted<Message>>> {
        check_batch(
            messages.iter().map(|m| m.idempotency_key.as_deref()),
            messages.len(),
        )?;
        let mut tx = self.write().await?;
        let mut rows = Vec::with_capacity(messages.len());
        for m in messages {
            if let Some(existing) = message_by_key(&mut tx, m.idempotency_key.as_deref()).await? {
                rows.push(Inserted {
                    row: existing,
                    created: false,
                    holder: None,
                });
                continue;
            }
            let (broker, seq, holder) = next_seq(&mut tx, m.agent_id, NEXT_MESSAGE_SEQ).await?;
            let row: Message = sqlx::query_as(
                "INSERT INTO messages
                     (id, agent_id, broker_id, seq, body, expires_at, idempotency_key,
                      created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) RETURNING *",
            )
            .bind(m.id)
            .bind(m.agent_id)
            .bind(broker)
            .bind(seq)
            .bind(Json(m.body))
            .bind(m.expires_at)
            .bind(m.idempotency_key)
            .bind(now())
            .fetch_one(&mut *tx)
            .await?;
            rows.push(Inserted {
                row,
                created: true,
                holder,
            });
        }
        tx.commit().await?;
        Ok(rows)
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
        let mut tx = self.write().await?;
        let mut q = claim_query("messages", "dispatched", sessions, claimer, limit);
        let mut rows: Vec<Message> = q.build_query_as().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.sort_by_key(|r| (r.agent_id, r.seq));
        Ok(rows)
    }

    async fn ack_messages(&self, broker: BrokerId, ids: &[MessageId]) -> StoreResult<Acked> {
        let mut acked = Acked::default();
        let mut tx = self.write().await?;
        for id in ids {
            let owner: Option<(BrokerId, String)> =
                sqlx::query_as("SELECT broker_id, state FROM messages WHERE id = ?1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match owner {
                Some((owner, state)) if owner == broker => {
                    if state == "pending" || state == "dispatched" {
                        sqlx::query(
                            "UPDATE messages SET state = 'delivered', delivered_at = ?2,
                                    updated_at = ?2
                             WHERE id = ?1",
                        )
                        .bind(id)
                        .bind(now())
                        .execute(&mut *tx)
                        .await?;
                        acked.delivered += 1;
                    }
                }
                _ => acked.not_found.push(*id),
            }
        }
        tx.commit().await?;
        Ok(acked)
    }

    async fn message(&self, id: MessageId) -> StoreResult<Message> {
        sqlx::query_as("SELECT * FROM messages WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("message"))
    }

    async fn expire_messages(&self) -> StoreResult<Vec<MessageId>> {
        Ok(sqlx::query_scalar(
            "UPDATE messages SET state = 'expired', updated_at = ?1
             WHERE state IN ('pending', 'dispatched') AND expires_at < ?1
             RETURNING id",
        )
        .bind(now())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn requeue_broker_in_flight(&self, broker: BrokerId) -> StoreResult<u64> {
        let mut tx = self.write().await?;
        let intents = sqlx::query(
            "UPDATE dispatch_intents SET state = 'pending', claimed_by = NULL, claimed_at = NULL,
                    updated_at = ?2
             WHERE broker_id = ?1 AND state = 'in_progress'",
        )
        .bind(broker)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        let messages = sqlx::query(
            "UPDATE messages SET state = 'pending', claimed_by = NULL, claimed_at = NULL,
                    updated_at = ?2
             WHERE broker_id = ?1 AND state = 'dispatched'",
        )
        .bind(broker)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(intents.rows_affected() + messages.rows_affected())
    }

    async fn add_admin_token(&self, token_hash: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO admin_tokens (token_hash, created_at) VALUES (?1, ?2)
             ON CONFLICT DO NOTHING",
        )
        .bind(token_hash)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn has_admin_tokens(&self) -> StoreResult<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM admin_tokens)")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn admin_token_exists(&self, token_hash: &str) -> StoreResult<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE token_hash = ?1)")
                .bind(token_hash)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn record_nonce(
        &self,
        broker: BrokerId,
        nonce: &str,
        keep: Duration,
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM broker_nonces WHERE seen_at < ?1")
            .bind(ago(keep))
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query(
            "INSERT INTO broker_nonces (broker_id, nonce, seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )
        .bind(broker)
        .bind(nonce)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune_finished(&self, older_than: Duration) -> StoreResult<u64> {
        let cutoff = ago(older_than);
        let mut tx = self.write().await?;
        let intents = sqlx::query(
            "DELETE FROM dispatch_intents WHERE state IN ('done', 'failed') AND updated_at < ?1",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await?;
        let messages = sqlx::query(
            "DELETE FROM messages WHERE state IN ('delivered', 'expired', 'failed')
               AND updated_at < ?1",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(intents.rows_affected() + messages.rows_affected())
    }

    async fn count_stuck(&self, older_than: Duration) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM dispatch_intents
                     WHERE state IN ('pending', 'in_progress') AND created_at < ?1)
                  + (SELECT count(*) FROM messages
                     WHERE state IN ('pending', 'dispatched') AND created_at < ?1)",
        )
        .bind(ago(older_than))
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    fn singleton(&self) -> Box<dyn Singleton> {
        Box::new(OnlyReplica)
    }

    async fn requeue_abandoned(&self, policy: RequeuePolicy) -> StoreResult<RequeueReport> {
        let lease_cutoff = ago(policy.lease);
        let live_cutoff = ago(policy.replica_stale_after);
        let mut tx = self.write().await?;
        let intents: Vec<String> = sqlx::query_scalar(
            "UPDATE dispatch_intents SET
                 state = CASE WHEN attempts >= ?3 THEN 'failed' ELSE 'pending' END,
                 error = CASE WHEN attempts >= ?3
                              THEN 'abandoned after ' || attempts || ' attempt(s)' ELSE error END,
                 claimed_by = CASE WHEN attempts >= ?3 THEN claimed_by END,
                 claimed_at = CASE WHEN attempts >= ?3 THEN claimed_at END,
                 updated_at = ?4
             WHERE state = 'in_progress'
               AND (claimed_at < ?1
                    OR NOT EXISTS (SELECT 1 FROM replicas r
                                   WHERE r.instance_id = claimed_by AND r.last_seen >= ?2))
             RETURNING state",
        )
        .bind(lease_cutoff)
        .bind(live_cutoff)
        .bind(policy.max_attempts)
        .bind(now())
        .fetch_all(&mut *tx)
        .await?;
        let messages: Vec<String> = sqlx::query_scalar(
            "UPDATE messages SET
                 state = CASE WHEN attempts >= ?3 THEN 'failed' ELSE 'pending' END,
                 claimed_by = CASE WHEN attempts >= ?3 THEN claimed_by END,
                 claimed_at = CASE WHEN attempts >= ?3 THEN claimed_at END,
                 updated_at = ?4
             WHERE state = 'dispatched'
               AND (claimed_at < ?1
                    OR NOT EXISTS (SELECT 1 FROM replicas r
                                   WHERE r.instance_id = claimed_by AND r.last_seen >= ?2))
             RETURNING state",
        )
        .bind(lease_cutoff)
        .bind(live_cutoff)
        .bind(policy.max_attempts)
        .bind(now())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let count =
            |rows: &[String], state: &str| rows.iter().filter(|s| *s == state).count() as u64;
        Ok(RequeueReport {
            intents_requeued: count(&intents, IntentState::Pending.as_str()),
            intents_failed: count(&intents, IntentState::Failed.as_str()),
            messages_requeued: count(&messages, MessageState::Pending.as_str()),
            messages_failed: count(&messages, MessageState::Failed.as_str()),
        })
    }
}

/// SQLite serves one replica, which is always the singleton.
#[derive(Debug)]
struct OnlyReplica;

#[async_trait]
impl Singleton for OnlyReplica {
    async fn hold(&mut self) -> StoreResult<bool> {
        Ok(true)
    }
}

async fn intent_by_key(
    tx: &mut Transaction<'static, Sqlite>,
    key: Option<&str>,
) -> StoreResult<Option<DispatchIntent>> {
    let Some(key) = key else { return Ok(None) };
    Ok(
        sqlx::query_as("SELECT * FROM dispatch_intents WHERE idempotency_key = ?1")
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?,
    )
}

async fn message_by_key(
    tx: &mut Transaction<'static, Sqlite>,
    key: Option<&str>,
) -> StoreResult<Option<Message>> {
    let Some(key) = key else { return Ok(None) };
    Ok(
        sqlx::query_as("SELECT * FROM messages WHERE idempotency_key = ?1")
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?,
    )
}
