//! [`Store`] on PostgreSQL: the multi-replica backend.
//!
//! Time comes from the database clock (`now()`), so replicas with skewed
//! clocks agree on liveness, leases and deadlines. Exactly-one claiming
//! locks the candidate agents with `FOR UPDATE SKIP LOCKED` and then claims
//! their rows in a second statement, whose fresh snapshot sees every claim
//! committed before the lock was taken.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::batch::{NewRow, StoredRow, check_batch, match_inserted};
use crate::error::{StoreError, StoreResult};
use crate::ids::{AgentId, BrokerId, IntentId, MessageId, ReplicaId, SessionId};
use crate::model::{
    Acked, Affinity, Agent, Broker, DispatchIntent, Inserted, IntentFilter, IntentOutcome,
    IntentState, Message, MessageState, NewAgent, NewIntent, NewMessage, Phase, Replica,
    RequeuePolicy, RequeueReport, SessionHeartbeat,
};
use crate::store::{Singleton, Store};

/// PostgreSQL implementation of [`Store`].
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Wraps a pool whose database is already migrated.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The underlying pool (the command bus listens on it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Whether any of the brokers has pending rows in `table`: one cheap
/// autocommit read that spares the claim transaction (four round trips)
/// when there is nothing to claim, the common case for one of the two
/// tables on every drain pass. A row committed just after this read is not
/// lost: its writer's wake-up (or the backstop) runs another pass.
async fn any_pending(
    pool: &PgPool,
    table: Table,
    sessions: &[(BrokerId, SessionId)],
) -> StoreResult<bool> {
    let brokers: Vec<Uuid> = sessions.iter().map(|(b, _)| b.0).collect();
    let sql = match table {
        Table::Intents => {
            "SELECT EXISTS (SELECT 1 FROM dispatch_intents
                            WHERE broker_id = ANY($1) AND state = 'pending')"
        }
        Table::Messages => {
            "SELECT EXISTS (SELECT 1 FROM messages WHERE broker_id = ANY($1) AND state = 'pending')"
        }
    };
    Ok(sqlx::query_scalar(sql)
        .bind(&brokers)
        .fetch_one(pool)
        .await?)
}

/// Of the given (broker, session) pairs, keeps the brokers whose live
/// session is still the given one, and holds a KEY SHARE lock on their rows
/// until the claim commits. `claim_affinity` locks the row FOR UPDATE, so a
/// new session's claim and an old session's claim cannot interleave: either
/// the old claim commits first (and the new session's requeue returns its
/// rows), or it waits, re-checks the session, and claims nothing.
async fn lock_live_sessions(
    tx: &mut Transaction<'static, Postgres>,
    sessions: &[(BrokerId, SessionId)],
) -> StoreResult<Vec<Uuid>> {
    let brokers: Vec<Uuid> = sessions.iter().map(|(b, _)| b.0).collect();
    let ids: Vec<Uuid> = sessions.iter().map(|(_, s)| s.0).collect();
    Ok(sqlx::query_scalar(
        "SELECT b.id FROM brokers b
         JOIN unnest($1::uuid[], $2::uuid[]) AS s(broker, session)
           ON b.id = s.broker AND b.session_id = s.session
         ORDER BY b.id
         FOR KEY SHARE OF b",
    )
    .bind(&brokers)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?)
}

/// Locks the given agents (in id order, so concurrent batches cannot
/// deadlock), checks that all exist and are not deleted, and reserves `n`
/// sequence numbers per agent from the counter of `table`. Returns, per
/// agent, its broker and the first reserved sequence number.
async fn reserve_seqs(
    tx: &mut Transaction<'static, Postgres>,
    counts: &BTreeMap<AgentId, i64>,
    table: Table,
) -> StoreResult<BTreeMap<AgentId, (BrokerId, i64)>> {
    let ids: Vec<Uuid> = counts.keys().map(|a| a.0).collect();
    let locked: Vec<(AgentId,)> = sqlx::query_as(
        "SELECT id FROM agents WHERE id = ANY($1) AND phase <> 'deleted' ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    if locked.len() != counts.len() {
        return Err(StoreError::NotFound("agent"));
    }
    let ns: Vec<i64> = counts.values().copied().collect();
    let sql = match table {
        Table::Messages => {
            "UPDATE agents a SET message_seq = a.message_seq + c.n, updated_at = a.updated_at
             FROM unnest($1::uuid[], $2::bigint[]) AS c(id, n)
             WHERE a.id = c.id
             RETURNING a.id, a.broker_id, a.message_seq - c.n + 1"
        }
        Table::Intents => {
            "UPDATE agents a SET intent_seq = a.intent_seq + c.n, updated_at = a.updated_at
             FROM unnest($1::uuid[], $2::bigint[]) AS c(id, n)
             WHERE a.id = c.id
             RETURNING a.id, a.broker_id, a.intent_seq - c.n + 1"
        }
    };
    let rows: Vec<(AgentId, BrokerId, i64)> = sqlx::query_as(sql)
        .bind(&ids)
        .bind(&ns)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(a, b, first)| (a, (b, first)))
        .collect())
}

/// The part of an idempotent batch insert that intents and messages share.
/// Items whose key names an existing row are answered with that row and
/// take no sequence numbers; the others (`fresh`) get their broker and the
/// next sequence numbers of their agent, in batch order.
struct BatchPlan<'a, N, R> {
    keys: Vec<String>,
    existing: Vec<R>,
    fresh: Vec<(&'a N, BrokerId, i64)>,
}

impl<'a, N, R> BatchPlan<'a, N, R>
where
    N: NewRow,
    R: StoredRow + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    async fn new(
        tx: &mut Transaction<'static, Postgres>,
        items: &'a [N],
        table: Table,
    ) -> StoreResult<Self> {
        check_batch(items.iter().map(NewRow::key), items.len())?;
        let keys: Vec<String> = items
            .iter()
            .filter_map(|i| i.key().map(str::to_owned))
            .collect();
        let existing: Vec<R> = rows_with_keys(tx, table, &keys).await?;
        let known: std::collections::HashSet<&str> =
            existing.iter().filter_map(StoredRow::key).collect();
        let fresh: Vec<&N> = items
            .iter()
            .filter(|i| i.key().is_none_or(|k| !known.contains(k)))
            .collect();
        let mut counts: BTreeMap<AgentId, i64> = BTreeMap::new();
        for item in &fresh {
            *counts.entry(item.agent()).or_default() += 1;
        }
        let mut next = if fresh.is_empty() {
            BTreeMap::new()
        } else {
            reserve_seqs(tx, &counts, table).await?
        };
        let mut planned = Vec::with_capacity(fresh.len());
        for item in fresh {
            let (broker, seq) = next
                .get_mut(&item.agent())
                .ok_or(StoreError::NotFound("agent"))?;
            planned.push((item, *broker, *seq));
            *seq += 1;
        }
        Ok(Self {
            keys,
            existing,
            fresh: planned,
        })
    }

    /// Pairs every item with its row, after the fresh ones were inserted
    /// with `ON CONFLICT (idempotency_key) DO NOTHING`.
    async fn finish(
        self,
        tx: &mut Transaction<'static, Postgres>,
        items: &[N],
        inserted: Vec<R>,
        table: Table,
    ) -> StoreResult<Vec<Inserted<R>>> {
        let existing = if inserted.len() < self.fresh.len() {
            // A concurrent insert won the race for a key: read the winner.
            rows_with_keys(tx, table, &self.keys).await?
        } else {
            self.existing
        };
        match_inserted(items, inserted, existing)
    }
}

async fn rows_with_keys<R>(
    tx: &mut Transaction<'static, Postgres>,
    table: Table,
    keys: &[String],
) -> StoreResult<Vec<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let sql = match table {
        Table::Intents => "SELECT * FROM dispatch_intents WHERE idempotency_key = ANY($1)",
        Table::Messages => "SELECT * FROM messages WHERE idempotency_key = ANY($1)",
    };
    Ok(sqlx::query_as(sql).bind(keys).fetch_all(&mut **tx).await?)
}

#[derive(Clone, Copy)]
/// The two tables of per-agent sequenced work.
enum Table {
    Messages,
    Intents,
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn register_replica(&self, id: ReplicaId, address: &str) -> StoreResult<Replica> {
        Ok(sqlx::query_as(
            "INSERT INTO replicas (instance_id, address) VALUES ($1, $2)
             ON CONFLICT (instance_id) DO UPDATE SET address = EXCLUDED.address, last_seen = now()
             RETURNING *",
        )
        .bind(id)
        .bind(address)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn heartbeat_replica(&self, id: ReplicaId) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE replicas SET last_seen = now() WHERE instance_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn live_replicas(&self, stale_after: Duration) -> StoreResult<Vec<Replica>> {
        Ok(sqlx::query_as(
            "SELECT * FROM replicas WHERE last_seen >= now() - make_interval(secs => $1)
             ORDER BY started_at, instance_id",
        )
        .bind(secs(stale_after))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn reap_dead_replicas(&self, stale_after: Duration) -> StoreResult<Vec<ReplicaId>> {
        let mut tx = self.pool.begin().await?;
        let dead: Vec<(ReplicaId,)> = sqlx::query_as(
            "DELETE FROM replicas WHERE last_seen < now() - make_interval(secs => $1)
             RETURNING instance_id",
        )
        .bind(secs(stale_after))
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE brokers SET status = 'offline', connected_replica = NULL, session_id = NULL,
                    connected_at = NULL, updated_at = now()
             WHERE connected_replica IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.instance_id = connected_replica)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(dead.into_iter().map(|(id,)| id).collect())
    }

    async fn deregister_replica(&self, id: ReplicaId) -> StoreResult<Vec<BrokerId>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM replicas WHERE instance_id = $1")
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
            "INSERT INTO brokers (id, name, secret_hash) VALUES ($1, $2, $3) RETURNING *",
        )
        .bind(id)
        .bind(name)
        .bind(secret_hash)
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
        sqlx::query_as("SELECT * FROM brokers WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("broker"))
    }

    async fn broker_by_name(&self, name: &str) -> StoreResult<Broker> {
        sqlx::query_as("SELECT * FROM brokers WHERE name = $1")
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
        let mut tx = self.pool.begin().await?;
        let found: Option<Option<uuid::Uuid>> =
            sqlx::query_scalar("SELECT session_id FROM brokers WHERE id = $1 FOR UPDATE")
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
            "SELECT count(*) FROM agents WHERE broker_id = $1 AND phase <> 'deleted'",
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
            "DELETE FROM messages WHERE broker_id = $1",
            "DELETE FROM dispatch_intents WHERE broker_id = $1",
            "DELETE FROM agents WHERE broker_id = $1",
            "DELETE FROM brokers WHERE id = $1",
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
        let mut tx = self.pool.begin().await?;
        let previous: Broker = sqlx::query_as("SELECT * FROM brokers WHERE id = $1 FOR UPDATE")
            .bind(broker)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound("broker"))?;
        sqlx::query(
            "UPDATE brokers SET status = 'online', connected_replica = $2, session_id = $3,
                    connected_at = now(), last_heartbeat = now(), updated_at = now()
             WHERE id = $1",
        )
        .bind(broker)
        .bind(replica)
        .bind(session)
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
                    connected_at = NULL, updated_at = now()
             WHERE id = $1 AND connected_replica = $2 AND session_id = $3",
        )
        .bind(broker)
        .bind(replica)
        .bind(session)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn heartbeat_session(
        &self,
        broker: BrokerId,
        session: SessionId,
    ) -> StoreResult<SessionHeartbeat> {
        let done = sqlx::query(
            "UPDATE brokers SET last_heartbeat = now() WHERE id = $1 AND session_id = $2",
        )
        .bind(broker)
        .bind(session)
        .execute(&self.pool)
        .await?;
        Ok(if done.rows_affected() == 1 {
            SessionHeartbeat::Current
        } else {
            SessionHeartbeat::Superseded
        })
    }

    async fn release_replica_affinities(&self, replica: ReplicaId) -> StoreResult<Vec<BrokerId>> {
        let mut tx = self.pool.begin().await?;
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
            "INSERT INTO agents (id, name, broker_id, command, env)
             VALUES ($1, $2, $3, $4, $5) RETURNING *",
        )
        .bind(id)
        .bind(&name)
        .bind(broker_id)
        .bind(Json(command))
        .bind(Json(env))
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
        sqlx::query_as("SELECT * FROM agents WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("agent"))
    }

    async fn agent_by_name(&self, name: &str) -> StoreResult<Agent> {
        sqlx::query_as("SELECT * FROM agents WHERE name = $1 AND phase <> 'deleted'")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("agent"))
    }

    async fn list_agents(&self, broker: Option<BrokerId>) -> StoreResult<Vec<Agent>> {
        Ok(sqlx::query_as(
            "SELECT * FROM agents WHERE $1::uuid IS NULL OR broker_id = $1 ORDER BY name, created_at",
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
            "UPDATE agents SET phase = $3, status_seq = $4, updated_at = now()
             WHERE id = $1 AND broker_id = $2 AND status_seq < $4 AND phase <> 'deleted'
             RETURNING *",
        )
        .bind(agent)
        .bind(broker)
        .bind(phase.as_str())
        .bind(status_seq)
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
                    updated_at = CASE WHEN phase = 'deleted' THEN updated_at ELSE now() END
             WHERE id = $1 RETURNING *",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound("agent"))
    }

    async fn insert_intents(
        &self,
        intents: Vec<NewIntent>,
    ) -> StoreResult<Vec<Inserted<DispatchIntent>>> {
        let mut tx = self.pool.begin().await?;
        let plan =
            BatchPlan::<NewIntent, DispatchIntent>::new(&mut tx, &intents, Table::Intents).await?;
        let mut cols = IntentColumns::default();
        for (i, broker, seq) in &plan.fresh {
            cols.id.push(i.id.0);
            cols.broker.push(broker.0);
            cols.agent.push(i.agent_id.0);
            cols.seq.push(*seq);
            cols.op.push(i.op.as_str());
            cols.args.push(Json(i.args.clone()));
            cols.deadline.push(i.deadline);
            cols.key.push(i.idempotency_key.clone());
        }
        let inserted: Vec<DispatchIntent> = sqlx::query_as(
            "INSERT INTO dispatch_intents
                 (id, broker_id, agent_id, seq, op, args, deadline, idempotency_key)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::text[],
                                  $6::jsonb[], $7::timestamptz[], $8::text[])
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING *",
        )
        .bind(&cols.id)
        .bind(&cols.broker)
        .bind(&cols.agent)
        .bind(&cols.seq)
        .bind(&cols.op)
        .bind(&cols.args)
        .bind(&cols.deadline)
        .bind(&cols.key)
        .fetch_all(&mut *tx)
        .await?;
        let rows = plan
            .finish(&mut tx, &intents, inserted, Table::Intents)
            .await?;
        tx.commit().await?;
        Ok(rows)
    }

    async fn claim_intents(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<DispatchIntent>> {
        if !any_pending(&self.pool, Table::Intents, sessions).await? {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let brokers = lock_live_sessions(&mut tx, sessions).await?;
        if brokers.is_empty() {
            return Ok(Vec::new());
        }
        let agents: Vec<Uuid> = sqlx::query_scalar(
            "SELECT a.id FROM agents a
             WHERE a.broker_id = ANY($1)
               AND EXISTS (SELECT 1 FROM dispatch_intents i
                           WHERE i.agent_id = a.id AND i.state = 'pending')
             ORDER BY a.id
             FOR UPDATE OF a SKIP LOCKED",
        )
        .bind(&brokers)
        .fetch_all(&mut *tx)
        .await?;
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows: Vec<DispatchIntent> = sqlx::query_as(
            "UPDATE dispatch_intents SET state = 'in_progress', claimed_by = $2,
                    claimed_at = now(), attempts = attempts + 1, updated_at = now()
             WHERE state = 'pending' AND id IN (
                 SELECT i.id FROM dispatch_intents i
                 WHERE i.agent_id = ANY($1) AND i.state = 'pending'
                   AND NOT EXISTS (SELECT 1 FROM dispatch_intents o
                                   WHERE o.agent_id = i.agent_id AND o.state = 'in_progress'
                                     AND o.claimed_by IS DISTINCT FROM $2)
                 ORDER BY i.agent_id, i.seq
                 LIMIT $3)
             RETURNING *",
        )
        .bind(&agents)
        .bind(claimer)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
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
            "UPDATE dispatch_intents SET state = $2, result = $3, error = $4, updated_at = now()
             WHERE id = $1 AND state IN ('pending', 'in_progress')",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(result)
        .bind(error)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        self.intent(id).await.map(|_| false)
    }

    async fn intent(&self, id: IntentId) -> StoreResult<DispatchIntent> {
        sqlx::query_as("SELECT * FROM dispatch_intents WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("dispatch"))
    }

    async fn intent_by_key(&self, key: &str) -> StoreResult<Option<DispatchIntent>> {
        Ok(
            sqlx::query_as("SELECT * FROM dispatch_intents WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn list_intents(&self, filter: IntentFilter) -> StoreResult<Vec<DispatchIntent>> {
        Ok(sqlx::query_as(
            "SELECT * FROM dispatch_intents
             WHERE ($1::uuid IS NULL OR broker_id = $1) AND ($2::text IS NULL OR state = $2)
             ORDER BY created_at DESC, seq DESC LIMIT $3",
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
                    updated_at = now()
             WHERE state IN ('pending', 'in_progress') AND deadline < now()
             RETURNING id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn insert_messages(
        &self,
        messages: Vec<NewMessage>,
    ) -> StoreResult<Vec<Inserted<Message>>> {
        let mut tx = self.pool.begin().await?;
        let plan =
            BatchPlan::<NewMessage, Message>::new(&mut tx, &messages, Table::Messages).await?;
        let mut cols = MessageColumns::default();
        for (m, broker, seq) in &plan.fresh {
            cols.id.push(m.id.0);
            cols.agent.push(m.agent_id.0);
            cols.broker.push(broker.0);
            cols.seq.push(*seq);
            cols.body.push(Json(m.body.clone()));
            cols.expires_at.push(m.expires_at);
            cols.key.push(m.idempotency_key.clone());
        }
        let inserted: Vec<Message> = sqlx::query_as(
            "INSERT INTO messages (id, agent_id, broker_id, seq, body, expires_at, idempotency_key)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::jsonb[],
                                  $6::timestamptz[], $7::text[])
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING *",
        )
        .bind(&cols.id)
        .bind(&cols.agent)
        .bind(&cols.broker)
        .bind(&cols.seq)
        .bind(&cols.body)
        .bind(&cols.expires_at)
        .bind(&cols.key)
        .fetch_all(&mut *tx)
        .await?;
        let rows = plan
            .finish(&mut tx, &messages, inserted, Table::Messages)
            .await?;
        tx.commit().await?;
        Ok(rows)
    }

    async fn claim_messages(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        if !any_pending(&self.pool, Table::Messages, sessions).await? {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let brokers = lock_live_sessions(&mut tx, sessions).await?;
        if brokers.is_empty() {
            return Ok(Vec::new());
        }
        let agents: Vec<Uuid> = sqlx::query_scalar(
            "SELECT a.id FROM agents a
             WHERE a.broker_id = ANY($1)
               AND EXISTS (SELECT 1 FROM messages m WHERE m.agent_id = a.id AND m.state = 'pending')
             ORDER BY a.id
             FOR UPDATE OF a SKIP LOCKED",
        )
        .bind(&brokers)
        .fetch_all(&mut *tx)
        .await?;
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows: Vec<Message> = sqlx::query_as(
            "UPDATE messages SET state = 'dispatched', claimed_by = $2,
                    claimed_at = now(), attempts = attempts + 1, updated_at = now()
             WHERE state = 'pending' AND id IN (
                 SELECT m.id FROM messages m
                 WHERE m.agent_id = ANY($1) AND m.state = 'pending'
                   AND NOT EXISTS (SELECT 1 FROM messages o
                                   WHERE o.agent_id = m.agent_id AND o.state = 'dispatched'
                                     AND o.claimed_by IS DISTINCT FROM $2)
                 ORDER BY m.agent_id, m.seq
                 LIMIT $3)
             RETURNING *",
        )
        .bind(&agents)
        .bind(claimer)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.sort_by_key(|r| (r.agent_id, r.seq));
        Ok(rows)
    }

    async fn ack_messages(&self, broker: BrokerId, ids: &[MessageId]) -> StoreResult<Acked> {
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        // One statement, no transaction: the common case (every id is this
        // broker's and was in flight) costs a single round trip.
        let delivered = sqlx::query(
            "UPDATE messages SET state = 'delivered', delivered_at = now(), updated_at = now()
             WHERE id = ANY($1) AND broker_id = $2 AND state IN ('pending', 'dispatched')",
        )
        .bind(&ids)
        .bind(broker)
        .execute(&self.pool)
        .await?
        .rows_affected();
        // Only when some id changed nothing: which of them are not ours?
        // (A message never changes broker, so reading after the update is
        // as good as reading within it.)
        let not_found = if delivered < ids.len() as u64 {
            let known: Vec<Uuid> =
                sqlx::query_scalar("SELECT id FROM messages WHERE id = ANY($1) AND broker_id = $2")
                    .bind(&ids)
                    .bind(broker)
                    .fetch_all(&self.pool)
                    .await?;
            ids.into_iter()
                .filter(|id| !known.contains(id))
                .map(MessageId)
                .collect()
        } else {
            Vec::new()
        };
        Ok(Acked {
            delivered,
            not_found,
        })
    }

    async fn message(&self, id: MessageId) -> StoreResult<Message> {
        sqlx::query_as("SELECT * FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound("message"))
    }

    async fn expire_messages(&self) -> StoreResult<Vec<MessageId>> {
        Ok(sqlx::query_scalar(
            "UPDATE messages SET state = 'expired', updated_at = now()
             WHERE state IN ('pending', 'dispatched') AND expires_at < now()
             RETURNING id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn requeue_broker_in_flight(&self, broker: BrokerId) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let intents = sqlx::query(
            "UPDATE dispatch_intents SET state = 'pending', claimed_by = NULL, claimed_at = NULL,
                    updated_at = now()
             WHERE broker_id = $1 AND state = 'in_progress'",
        )
        .bind(broker)
        .execute(&mut *tx)
        .await?;
        let messages = sqlx::query(
            "UPDATE messages SET state = 'pending', claimed_by = NULL, claimed_at = NULL,
                    updated_at = now()
             WHERE broker_id = $1 AND state = 'dispatched'",
        )
        .bind(broker)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(intents.rows_affected() + messages.rows_affected())
    }

    async fn add_admin_token(&self, token_hash: &str) -> StoreResult<()> {
        sqlx::query("INSERT INTO admin_tokens (token_hash) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(token_hash)
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
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE token_hash = $1)")
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
        sqlx::query("DELETE FROM broker_nonces WHERE seen_at < now() - make_interval(secs => $1)")
            .bind(secs(keep))
            .execute(&self.pool)
            .await?;
        let done = sqlx::query(
            "INSERT INTO broker_nonces (broker_id, nonce) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(broker)
        .bind(nonce)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune_finished(&self, older_than: Duration) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let intents = sqlx::query(
            "DELETE FROM dispatch_intents WHERE state IN ('done', 'failed')
               AND updated_at < now() - make_interval(secs => $1)",
        )
        .bind(secs(older_than))
        .execute(&mut *tx)
        .await?;
        let messages = sqlx::query(
            "DELETE FROM messages WHERE state IN ('delivered', 'expired', 'failed')
               AND updated_at < now() - make_interval(secs => $1)",
        )
        .bind(secs(older_than))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(intents.rows_affected() + messages.rows_affected())
    }

    async fn count_stuck(&self, older_than: Duration) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM dispatch_intents
                     WHERE state IN ('pending', 'in_progress')
                       AND created_at < now() - make_interval(secs => $1))
                  + (SELECT count(*) FROM messages
                     WHERE state IN ('pending', 'dispatched')
                       AND created_at < now() - make_interval(secs => $1))",
        )
        .bind(secs(older_than))
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    fn singleton(&self) -> Box<dyn Singleton> {
        Box::new(PgSingleton {
            pool: self.pool.clone(),
            conn: None,
        })
    }

    async fn requeue_abandoned(&self, policy: RequeuePolicy) -> StoreResult<RequeueReport> {
        let mut tx = self.pool.begin().await?;
        let intents: Vec<String> = sqlx::query_scalar(
            "UPDATE dispatch_intents SET
                 state = CASE WHEN attempts >= $3 THEN 'failed' ELSE 'pending' END,
                 error = CASE WHEN attempts >= $3
                              THEN 'abandoned after ' || attempts || ' attempt(s)' ELSE error END,
                 claimed_by = CASE WHEN attempts >= $3 THEN claimed_by END,
                 claimed_at = CASE WHEN attempts >= $3 THEN claimed_at END,
                 updated_at = now()
             WHERE state = 'in_progress'
               AND (claimed_at < now() - make_interval(secs => $1)
                    OR NOT EXISTS (SELECT 1 FROM replicas r
                                   WHERE r.instance_id = claimed_by
                                     AND r.last_seen >= now() - make_interval(secs => $2)))
             RETURNING state",
        )
        .bind(secs(policy.lease))
        .bind(secs(policy.replica_stale_after))
        .bind(policy.max_attempts)
        .fetch_all(&mut *tx)
        .await?;
        let messages: Vec<String> = sqlx::query_scalar(
            "UPDATE messages SET
                 state = CASE WHEN attempts >= $3 THEN 'failed' ELSE 'pending' END,
                 claimed_by = CASE WHEN attempts >= $3 THEN claimed_by END,
                 claimed_at = CASE WHEN attempts >= $3 THEN claimed_at END,
                 updated_at = now()
             WHERE state = 'dispatched'
               AND (claimed_at < now() - make_interval(secs => $1)
                    OR NOT EXISTS (SELECT 1 FROM replicas r
                                   WHERE r.instance_id = claimed_by
                                     AND r.last_seen >= now() - make_interval(secs => $2)))
             RETURNING state",
        )
        .bind(secs(policy.lease))
        .bind(secs(policy.replica_stale_after))
        .bind(policy.max_attempts)
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

/// Advisory-lock key of the cluster-singleton role ("swyd" + 1).
const SINGLETON_LOCK_KEY: i64 = 0x7377_7964_0000_0001;

/// Holds a session-level advisory lock on one pooled connection, kept out
/// of the pool for as long as it holds the lock. If that connection dies,
/// PostgreSQL releases the lock and another replica acquires it.
#[derive(Debug)]
struct PgSingleton {
    pool: PgPool,
    conn: Option<sqlx::pool::PoolConnection<Postgres>>,
}

impl Drop for PgSingleton {
    /// Closes the lock's connection instead of returning it to the pool,
    /// where it would keep holding the lock with nobody using it.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

#[async_trait]
impl Singleton for PgSingleton {
    async fn hold(&mut self) -> StoreResult<bool> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        // Re-entrant: asking again while holding it answers true.
        let held: bool = match sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(SINGLETON_LOCK_KEY)
            .fetch_one(&mut *conn)
            .await
        {
            Ok(held) => held,
            Err(err) => {
                conn.close_on_drop();
                return Err(err.into());
            }
        };
        if held {
            self.conn = Some(conn);
        }
        Ok(held)
    }
}

async fn release_all(
    tx: &mut Transaction<'static, Postgres>,
    replica: ReplicaId,
) -> StoreResult<Vec<BrokerId>> {
    Ok(sqlx::query_scalar(
        "UPDATE brokers SET status = 'offline', connected_replica = NULL, session_id = NULL,
                connected_at = NULL, updated_at = now()
         WHERE connected_replica = $1
         RETURNING id",
    )
    .bind(replica)
    .fetch_all(&mut **tx)
    .await?)
}

/// Column arrays for one `unnest` insert of intents.
#[derive(Default)]
struct IntentColumns {
    id: Vec<Uuid>,
    broker: Vec<Uuid>,
    agent: Vec<Uuid>,
    seq: Vec<i64>,
    op: Vec<&'static str>,
    args: Vec<Json<serde_json::Value>>,
    deadline: Vec<chrono::DateTime<chrono::Utc>>,
    key: Vec<Option<String>>,
}

/// Column arrays for one `unnest` insert of messages.
#[derive(Default)]
struct MessageColumns {
    id: Vec<Uuid>,
    agent: Vec<Uuid>,
    broker: Vec<Uuid>,
    seq: Vec<i64>,
    body: Vec<Json<serde_json::Value>>,
    expires_at: Vec<chrono::DateTime<chrono::Utc>>,
    key: Vec<Option<String>>,
}
