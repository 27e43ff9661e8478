//! [`Store`] on PostgreSQL: the multi-replica backend.
//!
//! Time comes from the database clock (`now()`), so replicas with skewed
//! clocks agree on liveness, leases and deadlines. A claim is one statement
//! (see [`Sequenced::claim_sql`]): it locks the live brokers, and claims rows
//! guarded by `state = 'pending'`, so each row goes to exactly one claimer.

use std::collections::BTreeMap;
use std::sync::LazyLock;
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

/// Runs a [`Sequenced::claim_sql`] statement; rows ordered by (agent, seq).
async fn claim<R>(
    pool: &PgPool,
    sql: &'static str,
    sessions: &[(BrokerId, SessionId)],
    claimer: ReplicaId,
    limit: u32,
) -> StoreResult<Vec<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let brokers: Vec<Uuid> = sessions.iter().map(|(b, _)| b.0).collect();
    let ids: Vec<Uuid> = sessions.iter().map(|(_, s)| s.0).collect();
    Ok(sqlx::query_as(sql)
        .bind(&brokers)
        .bind(&ids)
        .bind(claimer)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?)
}

/// A table of per-agent sequenced work (messages, dispatch intents), as
/// [`insert_sequenced`] writes it.
struct Sequenced {
    table: &'static str,
    /// Reads the rows with the keys in `$1`.
    by_keys: &'static str,
    /// The state of a claimed row.
    in_flight: &'static str,
    /// The `agents` column holding the last sequence number handed out.
    counter: &'static str,
    /// The table's own columns, with their types, bound as arrays after
    /// ids, agents and idempotency keys (`$4`, `$5`, ...).
    payload: &'static [(&'static str, &'static str)],
}

const MESSAGES: Sequenced = Sequenced {
    table: "messages",
    in_flight: "dispatched",
    by_keys: "SELECT * FROM messages WHERE idempotency_key = ANY($1) AND idempotency_key IS NOT NULL",
    counter: "message_seq",
    payload: &[("body", "jsonb"), ("expires_at", "timestamptz")],
};

const INTENTS: Sequenced = Sequenced {
    table: "dispatch_intents",
    in_flight: "in_progress",
    by_keys: "SELECT * FROM dispatch_intents
              WHERE idempotency_key = ANY($1) AND idempotency_key IS NOT NULL",
    counter: "intent_seq",
    payload: &[
        ("op", "text"),
        ("args", "jsonb"),
        ("deadline", "timestamptz"),
    ],
};

static INSERT_MESSAGES: LazyLock<String> = LazyLock::new(|| MESSAGES.insert_sql());
static INSERT_INTENTS: LazyLock<String> = LazyLock::new(|| INTENTS.insert_sql());
static CLAIM_MESSAGES: LazyLock<String> = LazyLock::new(|| MESSAGES.claim_sql());
static CLAIM_INTENTS: LazyLock<String> = LazyLock::new(|| INTENTS.claim_sql());

impl Sequenced {
    /// The idempotent, all-or-none batch insert as one autocommit
    /// statement (one round trip, one commit). The steps, as CTEs:
    ///
    /// 1. `existing`: rows whose idempotency key an item names; those items
    ///    are answered with them and take no sequence numbers (`fresh` are
    ///    the others).
    /// 2. `locked`: the items' agents, in id order (concurrent batches
    ///    cannot deadlock), `FOR UPDATE`, skipping deleted ones; and their
    ///    brokers `FOR KEY SHARE`, reading which replica holds the session.
    ///    `claim_affinity` locks the broker `FOR UPDATE`, so no new session
    ///    can be claimed between this read and the commit: either the
    ///    holder read here is woken, or the new session's first drain runs
    ///    after this commit and finds the rows.
    /// 3. `reserved`: takes `n` sequence numbers per agent. It sees each
    ///    agent row's newest version (READ COMMITTED re-checks rows changed
    ///    since the statement's snapshot), so no number is handed out twice.
    /// 4. `inserted`: the fresh items, numbered per agent in batch order.
    ///    An item whose agent was not reserved (missing or deleted) gets a
    ///    NULL broker, so the NOT NULL constraint fails the whole statement
    ///    and nothing is written: that error is the all-or-none "agent not
    ///    found".
    ///
    /// A concurrent insert can win the race for a key after `existing` was
    /// read; `ON CONFLICT DO NOTHING` skips the item (its reserved number
    /// stays unused: sequence numbers order rows, gaps are harmless) and
    /// [`insert_sequenced`] reads the winner afterwards.
    fn insert_sql(&self) -> String {
        let table = self.table;
        let counter = self.counter;
        let columns: Vec<&str> = self.payload.iter().map(|(c, _)| *c).collect();
        let arrays: Vec<String> = self
            .payload
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 4))
            .collect();
        let from_fresh: Vec<String> = columns.iter().map(|c| format!("f.{c}")).collect();
        let (columns, arrays, from_fresh) =
            (columns.join(", "), arrays.join(", "), from_fresh.join(", "));
        format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], {arrays})
                     WITH ORDINALITY AS t(id, agent_id, idempotency_key, {columns}, ord)
             ), existing AS (
                 SELECT * FROM {table}
                 WHERE idempotency_key IN (SELECT idempotency_key FROM input)
                   AND idempotency_key IS NOT NULL
             ), fresh AS (
                 SELECT * FROM input
                 WHERE idempotency_key IS NULL
                    OR idempotency_key NOT IN (SELECT idempotency_key FROM existing)
             ), counts AS (
                 SELECT agent_id, count(*) AS n FROM fresh GROUP BY agent_id
             ), locked AS MATERIALIZED (
                 SELECT a.id, b.connected_replica
                 FROM agents a JOIN brokers b ON b.id = a.broker_id
                 WHERE a.id IN (SELECT agent_id FROM counts) AND a.phase <> 'deleted'
                 ORDER BY a.id
                 FOR UPDATE OF a FOR KEY SHARE OF b
             ), reserved AS (
                 UPDATE agents a SET {counter} = a.{counter} + c.n
                 FROM counts c
                 WHERE a.id = c.agent_id AND a.id IN (SELECT id FROM locked)
                 RETURNING a.id, a.broker_id, a.{counter} - c.n AS before
             ), inserted AS (
                 INSERT INTO {table} (id, agent_id, broker_id, seq, idempotency_key, {columns})
                 SELECT f.id, f.agent_id, r.broker_id,
                        r.before + row_number() OVER (PARTITION BY f.agent_id ORDER BY f.ord),
                        f.idempotency_key, {from_fresh}
                 FROM fresh f LEFT JOIN reserved r ON r.id = f.agent_id
                 ORDER BY f.ord
                 ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                 RETURNING *
             )
             SELECT true AS created, l.connected_replica AS holder, i.*
             FROM inserted i JOIN locked l ON l.id = i.agent_id
             UNION ALL
             SELECT false, NULL::uuid, e.* FROM existing e"
        )
    }

    /// The claim: up to `$4` pending rows of the table for claimer `$3`,
    /// for the brokers whose live session is still the one given (`$1`,
    /// `$2`), in one autocommit statement (one round trip). The steps, as
    /// CTEs:
    ///
    /// 0. `relaxed`: `synchronous_commit = off` for this statement's own
    ///    transaction only (`set_config(..., true)` is `SET LOCAL`, so it
    ///    also holds behind a transaction-pooling PgBouncer and never leaks
    ///    to the connection's next user). A claim is a lease, not a promise
    ///    to a caller: if PostgreSQL crashes before the claim's commit
    ///    record is flushed, the row is simply `pending` again and is sent
    ///    again, which the broker drops as a duplicate by id (invariant 4),
    ///    exactly as after a requeue. WAL is flushed in order, so any later
    ///    synchronous commit (an ack, an outcome) makes the claim durable
    ///    too. Not waiting for the flush takes one fsync off the path from
    ///    accept to broker. Every candidate row is joined with `relaxed`,
    ///    so it is evaluated whenever the claim writes anything.
    /// 1. `candidates`: the brokers whose session is still the given one *and*
    ///    that have pending rows, locked `FOR KEY SHARE` until the claim
    ///    commits. `claim_affinity` locks the broker row `FOR UPDATE`, so a new
    ///    session's claim and an old session's claim cannot interleave: either
    ///    the old claim commits first (and the new session's requeue returns its
    ///    rows), or it waits, re-checks the session on the newest row version,
    ///    and claims nothing. Brokers without pending rows are filtered out
    ///    before locking, so an empty claim writes nothing (no transaction id,
    ///    no WAL): the common case for one of the two tables on every drain.
    ///    `KEY SHARE` does not conflict with the insert's lock on the broker.
    /// 2. `live`: of those, the brokers no other claim is working on, by a
    ///    transaction-scoped advisory try-lock per broker (released at commit).
    ///    Concurrent claims for one broker therefore never update the same
    ///    rows in different orders (which deadlocked); the one that loses
    ///    claims nothing for that broker. The hub runs one drain per session,
    ///    so this only matters to callers that claim concurrently.
    /// 3. `ready`: their agents with pending rows and none in flight at
    ///    another claimer (head-of-line: work never overtakes an earlier row
    ///    another replica holds). The in-flight probe is checked once per
    ///    agent, not per row, as three index range scans on (agent, claimer)
    ///    (below, above, missing): `IS DISTINCT FROM` would be a filter that
    ///    walks every row the claimer itself has in flight. Agents are not
    ///    locked: only claims for the agent's broker touch its rows, and they
    ///    are serialized by steps 1 and 2; per-agent order needs no lock
    ///    either, because sequence numbers are taken under the agent's row
    ///    lock until the insert commits, so any snapshot sees a prefix of each
    ///    agent's rows. (Locking agents `SKIP LOCKED`, as an earlier version
    ///    did, made a claim skip every agent an insert was writing to, and
    ///    under load the drain lost that race most of the time.)
    /// 4. The `UPDATE` of the first `$4` pending rows of those agents in
    ///    (agent, seq) order, guarded by `state = 'pending'`, so a row changed
    ///    after the statement's snapshot is re-checked on its newest version
    ///    and never claimed twice.
    ///
    /// Rows committed after the statement's snapshot are not seen; their
    /// writer wakes the drain after committing, so they are claimed by the
    /// next pass (or the backstop).
    fn claim_sql(&self) -> String {
        let (table, in_flight) = (self.table, self.in_flight);
        format!(
            "WITH relaxed AS MATERIALIZED (
                 SELECT set_config('synchronous_commit', 'off', true)
             ), candidates AS MATERIALIZED (
                 SELECT b.id FROM relaxed, brokers b
                 JOIN unnest($1::uuid[], $2::uuid[]) AS s(broker, session)
                   ON b.id = s.broker AND b.session_id = s.session
                 WHERE EXISTS (SELECT 1 FROM agents a JOIN {table} w ON w.agent_id = a.id
                               WHERE a.broker_id = b.id AND w.state = 'pending')
                 ORDER BY b.id
                 FOR KEY SHARE OF b
             ), live AS MATERIALIZED (
                 SELECT id FROM candidates
                 WHERE pg_try_advisory_xact_lock(hashtextextended('switchyard-claim:' || id::text, 0))
             ), ready AS (
                 SELECT a.id FROM agents a
                 WHERE a.broker_id IN (SELECT id FROM live)
                   AND EXISTS (SELECT 1 FROM {table} w WHERE w.agent_id = a.id AND w.state = 'pending')
                   AND NOT EXISTS (SELECT 1 FROM {table} o
                                   WHERE o.agent_id = a.id AND o.state = '{in_flight}'
                                     AND o.claimed_by < $3)
                   AND NOT EXISTS (SELECT 1 FROM {table} o
                                   WHERE o.agent_id = a.id AND o.state = '{in_flight}'
                                     AND o.claimed_by > $3)
                   AND NOT EXISTS (SELECT 1 FROM {table} o
                                   WHERE o.agent_id = a.id AND o.state = '{in_flight}'
                                     AND o.claimed_by IS NULL)
             )
             UPDATE {table} SET state = '{in_flight}', claimed_by = $3,
                    claimed_at = now(), attempts = attempts + 1, updated_at = now()
             WHERE state = 'pending' AND id IN (
                 SELECT w.id FROM {table} w
                 WHERE w.agent_id IN (SELECT id FROM ready) AND w.state = 'pending'
                 ORDER BY w.agent_id, w.seq
                 LIMIT $4)
             RETURNING *"
        )
    }
}

/// A row of the insert statement's answer.
#[derive(sqlx::FromRow)]
struct Written<T> {
    created: bool,
    holder: Option<ReplicaId>,
    #[sqlx(flatten)]
    row: T,
}

/// Runs a [`Sequenced::insert_sql`] statement (`query`, with the ids,
/// agents, keys and payload arrays already bound) and answers each item
/// (see [`match_inserted`]).
async fn insert_sequenced<'q, N, R>(
    pool: &PgPool,
    table: &Sequenced,
    items: &[N],
    query: sqlx::query::QueryAs<'q, Postgres, Written<R>, sqlx::postgres::PgArguments>,
) -> StoreResult<Vec<Inserted<R>>>
where
    N: NewRow,
    R: StoredRow + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let written: Vec<Written<R>> = match query.fetch_all(pool).await {
        Ok(written) => written,
        Err(sqlx::Error::Database(db)) if db.kind() == sqlx::error::ErrorKind::NotNullViolation => {
            // Only the broker of an unreserved agent can be NULL here.
            return Err(StoreError::NotFound("agent"));
        }
        Err(err) => return Err(err.into()),
    };
    let mut holders = BTreeMap::new();
    let (mut inserted, mut existing) = (Vec::new(), Vec::new());
    for w in written {
        if w.created {
            holders.insert(w.row.broker(), w.holder);
            inserted.push(w.row);
        } else {
            existing.push(w.row);
        }
    }
    if inserted.len() + existing.len() < items.len() {
        // A concurrent insert won the race for a key: read the winner.
        let keys: Vec<&str> = items.iter().filter_map(NewRow::key).collect();
        existing = sqlx::query_as(table.by_keys)
            .bind(keys)
            .fetch_all(pool)
            .await?;
    }
    match_inserted(items, inserted, existing, &holders)
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
        check_batch(intents.iter().map(NewRow::key), intents.len())?;
        let query = sqlx::query_as(INSERT_INTENTS.as_str())
            .bind(intents.iter().map(|i| i.id.0).collect::<Vec<_>>())
            .bind(intents.iter().map(|i| i.agent_id.0).collect::<Vec<_>>())
            .bind(intents.iter().map(NewRow::key).collect::<Vec<_>>())
            .bind(intents.iter().map(|i| i.op.as_str()).collect::<Vec<_>>())
            .bind(intents.iter().map(|i| Json(&i.args)).collect::<Vec<_>>())
            .bind(intents.iter().map(|i| i.deadline).collect::<Vec<_>>());
        insert_sequenced(&self.pool, &INTENTS, &intents, query).await
    }

    async fn claim_intents(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<DispatchIntent>> {
        let mut rows: Vec<DispatchIntent> =
            claim(&self.pool, CLAIM_INTENTS.as_str(), sessions, claimer, limit).await?;
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
            sqlx::query_as(
                "SELECT * FROM dispatch_intents WHERE idempotency_key = $1 AND idempotency_key IS NOT NULL",
            )
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
        check_batch(messages.iter().map(NewRow::key), messages.len())?;
        let query = sqlx::query_as(INSERT_MESSAGES.as_str())
            .bind(messages.iter().map(|m| m.id.0).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| m.agent_id.0).collect::<Vec<_>>())
            .bind(messages.iter().map(NewRow::key).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| Json(&m.body)).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| m.expires_at).collect::<Vec<_>>());
        insert_sequenced(&self.pool, &MESSAGES, &messages, query).await
    }

    async fn claim_messages(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        let mut rows: Vec<Message> = claim(
            &self.pool,
            CLAIM_MESSAGES.as_str(),
            sessions,
            claimer,
            limit,
        )
        .await?;
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
