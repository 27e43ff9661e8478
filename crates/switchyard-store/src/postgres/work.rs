//! The PostgreSQL work statements: each batch insert and each claim is one
//! set-based statement (one round trip, one commit), and a batch ack is one
//! update.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use sqlx::types::Json;
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

use crate::batch::{NewRow, StoredRow, match_inserted};
use crate::error::{Entity, StoreError, StoreResult};
use crate::ids::{AgentId, BrokerId, MessageId, ReplicaId, SessionId};
use crate::model::{Acked, DispatchIntent, Inserted, Message, MessageRef, NewIntent, NewMessage};
use crate::postgres::PgStore;
use crate::rules::{DELETED, DELIVERED, INTENT, MESSAGE, WorkStates};
use crate::store::WorkDialect;

/// Runs a [`Sequenced::claim_sql`] statement.
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
    /// The partial unique index on the idempotency key.
    key_index: &'static str,
    /// The table's states.
    states: &'static LazyLock<WorkStates>,
    /// The other table of sequenced work, and its states: a row is claimed
    /// only when no unfinished row of the other table comes before it in
    /// the agent's one order (`ord`).
    other: &'static str,
    other_states: &'static LazyLock<WorkStates>,
    /// The `agents` column holding the last sequence number handed out.
    counter: &'static str,
    /// The table's own columns, with their types, bound as arrays after
    /// ids, agents, idempotency keys and request digests (`$5`, `$6`, ...).
    payload: &'static [(&'static str, &'static str)],
    /// Rows have lifetimes (`expires_at`, `deliver_after`; messages): a
    /// claim skips expired rows, and a row waits while a pending row of
    /// its agent up to it (itself included) is not due yet.
    timed: bool,
}

const MESSAGES: Sequenced = Sequenced {
    table: "messages",
    states: &MESSAGE,
    other: "dispatch_intents",
    other_states: &INTENT,
    key_index: "messages_idempotency_key",
    counter: "message_seq",
    payload: &[
        ("body", "jsonb"),
        ("expires_at", "timestamptz"),
        ("deliver_after", "timestamptz"),
    ],
    timed: true,
};

const INTENTS: Sequenced = Sequenced {
    table: "dispatch_intents",
    states: &INTENT,
    other: "messages",
    other_states: &MESSAGE,
    key_index: "dispatch_intents_idempotency_key",
    counter: "intent_seq",
    payload: &[
        ("op", "text"),
        ("name", "text"),
        ("args", "jsonb"),
        ("deadline", "timestamptz"),
    ],
    timed: false,
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
    ///    the others). If one of them was created by a different request
    ///    (`reused`: another digest), nothing is fresh: the statement writes
    ///    nothing and [`match_inserted`] refuses the batch.
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
    /// read: the key's unique index then fails the whole statement (nothing
    /// is written) and [`insert_sequenced`] runs it again, when `existing`
    /// sees the winner. (`ON CONFLICT DO NOTHING` would skip only that item
    /// and commit the others, breaking all-or-none when the winner was a
    /// different request.)
    fn insert_sql(&self) -> String {
        let table = self.table;
        let counter = self.counter;
        let deleted = *DELETED;
        let columns: Vec<&str> = self.payload.iter().map(|(c, _)| *c).collect();
        let arrays: Vec<String> = self
            .payload
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 5))
            .collect();
        let from_fresh: Vec<String> = columns.iter().map(|c| format!("f.{c}")).collect();
        let (columns, arrays, from_fresh) =
            (columns.join(", "), arrays.join(", "), from_fresh.join(", "));
        format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], {arrays})
                     WITH ORDINALITY AS t(id, agent_id, idempotency_key, request_digest,
                                          {columns}, pos)
             ), existing AS (
                 SELECT * FROM {table}
                 WHERE idempotency_key IN (SELECT idempotency_key FROM input)
                   AND idempotency_key IS NOT NULL
             ), reused AS (
                 SELECT 1 FROM existing e JOIN input i ON i.idempotency_key = e.idempotency_key
                 WHERE i.request_digest IS DISTINCT FROM e.request_digest
             ), fresh AS (
                 SELECT * FROM input
                 WHERE NOT EXISTS (SELECT 1 FROM reused)
                   AND (idempotency_key IS NULL
                        OR idempotency_key NOT IN (SELECT idempotency_key FROM existing))
             ), counts AS (
                 SELECT agent_id, count(*) AS n FROM fresh GROUP BY agent_id
             ), locked AS MATERIALIZED (
                 SELECT a.id, b.connected_replica
                 FROM agents a JOIN brokers b ON b.id = a.broker_id
                 WHERE a.id IN (SELECT agent_id FROM counts) AND a.phase <> {deleted}
                 ORDER BY a.id
                 FOR UPDATE OF a FOR KEY SHARE OF b
             ), reserved AS (
                 UPDATE agents a SET {counter} = a.{counter} + c.n, work_seq = a.work_seq + c.n
                 FROM counts c
                 WHERE a.id = c.agent_id AND a.id IN (SELECT id FROM locked)
                 RETURNING a.id, a.broker_id, a.{counter} - c.n AS before,
                           a.work_seq - c.n AS ord_before
             ), inserted AS (
                 INSERT INTO {table}
                     (id, agent_id, broker_id, seq, ord, idempotency_key, request_digest, {columns})
                 SELECT f.id, f.agent_id, r.broker_id,
                        r.before + row_number() OVER (PARTITION BY f.agent_id ORDER BY f.pos),
                        r.ord_before + row_number() OVER (PARTITION BY f.agent_id ORDER BY f.pos),
                        f.idempotency_key, f.request_digest, {from_fresh}
                 FROM fresh f LEFT JOIN reserved r ON r.id = f.agent_id
                 ORDER BY f.pos
                 RETURNING *
             )
             SELECT true AS created, l.connected_replica AS owner, i.*
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
    ///    transaction-scoped advisory try-lock per broker and table (released
    ///    at commit; per table, because a drain claims intents and messages
    ///    at the same time, and with one lock per broker one of the two
    ///    claimed nothing: that work waited for the backstop, and messages
    ///    overtook the dispatches written before them).
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
    ///    (agent, seq) order that no unfinished row of the other table
    ///    precedes in the agent's one order (`ord`: an operation waits for
    ///    the messages written before it to be acked, a message for the
    ///    operations written before it to finish), guarded by `state =
    ///    'pending'`, so a row changed after the statement's snapshot is
    ///    re-checked on its newest version and never claimed twice. Both
    ///    tables take `ord` from `agents.work_seq` under the agent's row
    ///    lock, so a snapshot never sees a later row without the earlier
    ///    ones of the other table.
    ///
    /// Rows committed after the statement's snapshot are not seen; their
    /// writer wakes the drain after committing, so they are claimed by the
    /// next pass (or the backstop).
    fn claim_sql(&self) -> String {
        let table = self.table;
        let (pending, in_flight) = (self.states.pending, self.states.in_flight);
        // One probe per state, each matching a partial index's predicate
        // (`state IN (...)` implies neither, and would scan the table).
        let other = self.other;
        let (other_pending, other_in_flight) =
            (self.other_states.pending, self.other_states.in_flight);
        // The delayed-row probe reads only the partial index of delayed
        // pending rows (messages_delayed).
        // The other table is messages when this one is not: an expired
        // message is never sent, so it holds back nothing (before the
        // sweeper marks it).
        let other_live = if self.timed {
            ""
        } else {
            "AND x.expires_at > now()"
        };
        let timed = if self.timed {
            format!(
                "AND w.expires_at > now()
                   AND NOT EXISTS (SELECT 1 FROM {table} d
                                   WHERE d.agent_id = w.agent_id AND d.state = {pending}
                                     AND d.deliver_after IS NOT NULL AND d.seq <= w.seq
                                     AND d.deliver_after > now())"
            )
        } else {
            String::new()
        };
        format!(
            "WITH relaxed AS MATERIALIZED (
                 SELECT set_config('synchronous_commit', 'off', true)
             ), candidates AS MATERIALIZED (
                 SELECT b.id FROM relaxed, brokers b
                 JOIN unnest($1::uuid[], $2::uuid[]) AS s(broker, session)
                   ON b.id = s.broker AND b.session_id = s.session
                 WHERE EXISTS (SELECT 1 FROM agents a JOIN {table} w ON w.agent_id = a.id
                               WHERE a.broker_id = b.id AND w.state = {pending})
                 ORDER BY b.id
                 FOR KEY SHARE OF b
             ), live AS MATERIALIZED (
                 SELECT id FROM candidates
                 WHERE pg_try_advisory_xact_lock(
                     hashtextextended('switchyard-claim:{table}:' || id::text, 0))
             ), ready AS (
                 SELECT a.id FROM agents a
                 WHERE a.broker_id IN (SELECT id FROM live)
                   AND EXISTS (SELECT 1 FROM {table} w WHERE w.agent_id = a.id AND w.state = {pending})
                   AND NOT EXISTS (SELECT 1 FROM {table} o
                                   WHERE o.agent_id = a.id AND o.state = {in_flight}
                                     AND o.claimed_by < $3)
                   AND NOT EXISTS (SELECT 1 FROM {table} o
                                   WHERE o.agent_id = a.id AND o.state = {in_flight}
                                     AND o.claimed_by > $3)
                   AND NOT EXISTS (SELECT 1 FROM {table} o
                                   WHERE o.agent_id = a.id AND o.state = {in_flight}
                                     AND o.claimed_by IS NULL)
             )
             UPDATE {table} SET state = {in_flight}, claimed_by = $3,
                    claimed_at = now(), attempts = attempts + 1, updated_at = now()
             WHERE state = {pending} AND id IN (
                 SELECT w.id FROM {table} w
                 WHERE w.agent_id IN (SELECT id FROM ready) AND w.state = {pending}
                   AND NOT EXISTS (SELECT 1 FROM {other} x
                                   WHERE x.agent_id = w.agent_id
                                     AND x.state = {other_pending} AND x.ord < w.ord
                                     {other_live})
                   AND NOT EXISTS (SELECT 1 FROM {other} x
                                   WHERE x.agent_id = w.agent_id
                                     AND x.state = {other_in_flight} AND x.ord < w.ord)
                   {timed}
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
    owner: Option<ReplicaId>,
    #[sqlx(flatten)]
    row: T,
}

/// Runs a [`Sequenced::insert_sql`] statement (`query` builds it, with the
/// ids, agents, keys, digests and payload arrays bound) and answers each
/// item (see [`match_inserted`]). A statement that lost a race for a key is
/// run again (see [`Sequenced::insert_sql`]); after [`KEY_RACES`] lost races
/// the conflict is reported.
async fn insert_sequenced<'q, N, R>(
    pool: &PgPool,
    table: &Sequenced,
    items: &[N],
    query: impl Fn() -> sqlx::query::QueryAs<'q, Postgres, Written<R>, sqlx::postgres::PgArguments>,
) -> StoreResult<Vec<Inserted<R>>>
where
    N: NewRow,
    R: StoredRow + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let mut races = 0;
    let written: Vec<Written<R>> = loop {
        match query().fetch_all(pool).await {
            Ok(written) => break written,
            Err(sqlx::Error::Database(db))
                if db.kind() == sqlx::error::ErrorKind::NotNullViolation =>
            {
                // Only the broker of an unreserved agent can be NULL here.
                return Err(StoreError::NotFound(Entity::Agent));
            }
            Err(sqlx::Error::Database(db))
                if db.constraint() == Some(table.key_index) && races < KEY_RACES =>
            {
                races += 1;
            }
            Err(err) => return Err(err.into()),
        }
    };
    let mut owners = BTreeMap::new();
    let (mut inserted, mut existing) = (Vec::new(), Vec::new());
    for w in written {
        if w.created {
            owners.insert(w.row.broker(), w.owner);
            inserted.push(w.row);
        } else {
            existing.push(w.row);
        }
    }
    match_inserted(items, inserted, existing, &owners)
}

/// Races for one key a batch insert runs again before giving up.
const KEY_RACES: u32 = 3;

impl WorkDialect for PgStore {
    async fn insert_intent_batch(
        &self,
        intents: Vec<NewIntent>,
    ) -> StoreResult<Vec<Inserted<DispatchIntent>>> {
        let query = || {
            sqlx::query_as(INSERT_INTENTS.as_str())
                .bind(intents.iter().map(|i| i.id.0).collect::<Vec<_>>())
                .bind(intents.iter().map(|i| i.agent_id.0).collect::<Vec<_>>())
                .bind(intents.iter().map(NewRow::key).collect::<Vec<_>>())
                .bind(intents.iter().map(NewRow::digest).collect::<Vec<_>>())
                .bind(intents.iter().map(|i| i.op.as_str()).collect::<Vec<_>>())
                .bind(
                    intents
                        .iter()
                        .map(|i| i.name.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(intents.iter().map(|i| Json(&i.args)).collect::<Vec<_>>())
                .bind(intents.iter().map(|i| i.deadline).collect::<Vec<_>>())
        };
        insert_sequenced(&self.pool, &INTENTS, &intents, query).await
    }

    async fn insert_message_batch(
        &self,
        messages: Vec<NewMessage>,
    ) -> StoreResult<Vec<Inserted<Message>>> {
        let query = || {
            sqlx::query_as(INSERT_MESSAGES.as_str())
                .bind(messages.iter().map(|m| m.id.0).collect::<Vec<_>>())
                .bind(messages.iter().map(|m| m.agent_id.0).collect::<Vec<_>>())
                .bind(messages.iter().map(NewRow::key).collect::<Vec<_>>())
                .bind(messages.iter().map(NewRow::digest).collect::<Vec<_>>())
                .bind(messages.iter().map(|m| Json(&m.body)).collect::<Vec<_>>())
                .bind(messages.iter().map(|m| m.expires_at).collect::<Vec<_>>())
                .bind(messages.iter().map(|m| m.deliver_after).collect::<Vec<_>>())
        };
        insert_sequenced(&self.pool, &MESSAGES, &messages, query).await
    }

    async fn claim_intent_rows(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<DispatchIntent>> {
        claim(&self.pool, CLAIM_INTENTS.as_str(), sessions, claimer, limit).await
    }

    async fn claim_message_rows(
        &self,
        sessions: &[(BrokerId, SessionId)],
        claimer: ReplicaId,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        claim(
            &self.pool,
            CLAIM_MESSAGES.as_str(),
            sessions,
            claimer,
            limit,
        )
        .await
    }

    /// One statement, no transaction: the common case (every id is this
    /// broker's and was in flight) costs a single round trip.
    async fn receive_rows(&self, broker: BrokerId, ids: &[Uuid]) -> StoreResult<Vec<Uuid>> {
        // One statement: both updates run whatever the final SELECT reads,
        // which sees the rows as of the statement's start (existence is
        // all it asks).
        static RECEIVE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH received_intents AS (
                     UPDATE dispatch_intents SET received_at = now()
                     WHERE id = ANY($1) AND broker_id = $2 AND state = {intent_in_flight}
                 ), received_messages AS (
                     UPDATE messages SET received_at = now()
                     WHERE id = ANY($1) AND broker_id = $2 AND state = {message_in_flight}
                 )
                 SELECT id FROM dispatch_intents WHERE id = ANY($1) AND broker_id = $2
                 UNION ALL
                 SELECT id FROM messages WHERE id = ANY($1) AND broker_id = $2",
                intent_in_flight = INTENT.in_flight,
                message_in_flight = MESSAGE.in_flight,
            )
        });
        Ok(sqlx::query_scalar(RECEIVE.as_str())
            .bind(ids)
            .bind(broker)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn deliver(&self, broker: BrokerId, ids: &[MessageId]) -> StoreResult<Acked> {
        static DELIVER: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE messages SET state = {delivered}, delivered_at = now(), updated_at = now()
                 WHERE id = ANY($1) AND broker_id = $2 AND state IN {unfinished}
                 RETURNING id, agent_id, broker_id, EXTRACT(EPOCH FROM now() - created_at)::float8",
                delivered = *DELIVERED,
                unfinished = MESSAGE.unfinished,
            )
        });
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let rows: Vec<(MessageId, AgentId, BrokerId, f64)> = sqlx::query_as(DELIVER.as_str())
            .bind(&ids)
            .bind(broker)
            .fetch_all(&self.pool)
            .await?;
        let delivered = rows.len() as u64;
        let (messages, waited) = rows
            .into_iter()
            .map(|(id, agent_id, broker_id, secs)| {
                let message = MessageRef {
                    id,
                    agent_id,
                    broker_id,
                };
                (message, seconds(secs))
            })
            .unzip();
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
            messages,
            not_found,
            waited,
        })
    }
}

/// A non-negative number of seconds (clocks may disagree by a little).
fn seconds(secs: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(secs).unwrap_or_default()
}
