//! Upkeep of the whole store: readiness, the singleton role, returning
//! abandoned work, and pruning finished rows.

use std::time::Duration;

use async_trait::async_trait;

use crate::dialect::{BindNow, Dialect, for_each_backend, sql};
use crate::error::StoreResult;
use crate::ids::{HubId, IntentId, MessageId};
use crate::model::{QueueDepth, RequeuePolicy, RequeueReport, Requeued};
use crate::rules::{ABANDONED, INTENT, MESSAGE, POLL};

/// One replica's claim on the cluster-singleton role.
#[async_trait]
pub trait Singleton: Send + std::fmt::Debug {
    /// Whether this contender holds the role now, acquiring it if it is
    /// free. Call before each singleton duty.
    async fn hold(&mut self) -> StoreResult<bool>;
}

/// Keeps the store in shape: the duties of the cluster singleton and the
/// checks an operator watches.
#[async_trait]
pub trait Housekeeping: Send + Sync {
    /// Which backend this is (`"postgres"` or `"sqlite"`), for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Round trip to the database (readiness).
    async fn ping(&self) -> StoreResult<()>;

    /// Which hub this database holds: made by the schema's migration, and
    /// taken over from the source by `switchyard db copy`.
    async fn hub_id(&self) -> StoreResult<HubId>;

    /// A contender for the cluster-singleton role (the sweeper). At most one
    /// contender in the cluster holds it at a time; it is lost when its
    /// database connection dies, and another contender takes over.
    fn singleton(&self) -> Box<dyn Singleton>;

    /// Puts claimed-but-unfinished intents and messages whose claimer is
    /// dead or whose lease ran out back to `pending`, or fails them once
    /// they have been tried `max_attempts` times. A broker whose latest
    /// session polls has a shorter lease, `poll_lease`, on what it has not
    /// said it received.
    async fn requeue_abandoned(&self, policy: RequeuePolicy) -> StoreResult<RequeueReport>;

    /// Deletes finished intents (`done`, `failed`) and messages
    /// (`delivered`, `expired`, `failed`) last changed before `older_than`
    /// ago. Returns how many rows went.
    async fn prune_finished(&self, older_than: Duration) -> StoreResult<u64>;

    /// Intents and messages not finished although created more than
    /// `older_than` ago: work that is stuck (e.g. its broker is offline).
    async fn count_stuck(&self, older_than: Duration) -> StoreResult<u64>;

    /// Unfinished intents and messages (pending or in flight) per broker
    /// name, for brokers that have any.
    async fn queue_depths(&self) -> StoreResult<Vec<(String, i64)>>;

    /// Unfinished intents and messages per agent (and per broker for its
    /// broker-scoped calls, with no agent), for those that have any.
    async fn queue_depths_by_agent(&self) -> StoreResult<Vec<QueueDepth>>;
}

/// How a backend keeps the singleton role.
pub(crate) trait HousekeepingDialect {
    fn contender(&self) -> Box<dyn Singleton>;
}

for_each_backend! {
    #[async_trait]
    impl Housekeeping for Backend {
        fn backend(&self) -> &'static str {
            <Backend as Dialect>::NAME
        }

        async fn ping(&self) -> StoreResult<()> {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        }

        async fn hub_id(&self) -> StoreResult<HubId> {
            Ok(sqlx::query_scalar("SELECT hub_id FROM hub_identity")
                .fetch_one(&self.pool)
                .await?)
        }

        fn singleton(&self) -> Box<dyn Singleton> {
            self.contender()
        }

        async fn requeue_abandoned(&self, policy: RequeuePolicy) -> StoreResult<RequeueReport> {
            let mut tx = self.write().await?;
            // `$3` is the attempt limit (see `WorkStates::requeue_set`).
            let intents: Vec<Requeued<IntentId>> = sqlx::query_as(sql!(
                "UPDATE dispatch_intents SET {requeue},
                     updated_at = @now
                 WHERE state = {in_flight}
                   AND (claimed_at < @ago($1)
                        OR NOT EXISTS (SELECT 1 FROM replicas r
                                       WHERE r.instance_id = claimed_by AND r.last_seen >= @ago($2))
                        OR (claimed_at < @ago($4)
                                 AND (received_at IS NULL OR received_at < claimed_at)
                            AND broker_id IN (SELECT id FROM brokers WHERE transport = {poll})))
                 RETURNING id, agent_id, broker_id, state",
                requeue = INTENT.requeue_set("$3", ABANDONED),
                in_flight = INTENT.in_flight,
                poll = *POLL,
            ))
            .bind(Backend::ago(policy.lease))
            .bind(Backend::ago(policy.replica_stale_after))
            .bind(policy.max_attempts)
            .bind(Backend::ago(policy.poll_lease))
            .bind_now()
            .fetch_all(&mut *tx)
            .await?;
            let messages: Vec<Requeued<MessageId>> = sqlx::query_as(sql!(
                "UPDATE messages SET {requeue},
                     updated_at = @now
                 WHERE state = {in_flight}
                   AND (claimed_at < @ago($1)
                        OR NOT EXISTS (SELECT 1 FROM replicas r
                                       WHERE r.instance_id = claimed_by AND r.last_seen >= @ago($2))
                        OR (claimed_at < @ago($4)
                                 AND (received_at IS NULL OR received_at < claimed_at)
                            AND broker_id IN (SELECT id FROM brokers WHERE transport = {poll})))
                 RETURNING id, agent_id, broker_id, state",
                requeue = MESSAGE.requeue_set("$3", ABANDONED),
                in_flight = MESSAGE.in_flight,
                poll = *POLL,
            ))
            .bind(Backend::ago(policy.lease))
            .bind(Backend::ago(policy.replica_stale_after))
            .bind(policy.max_attempts)
            .bind(Backend::ago(policy.poll_lease))
            .bind_now()
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(RequeueReport::counted(&intents, &messages))
        }

        async fn prune_finished(&self, older_than: Duration) -> StoreResult<u64> {
            let mut tx = self.write().await?;
            let intents = sqlx::query(sql!(
                "DELETE FROM dispatch_intents WHERE state IN {finished} AND updated_at < @ago($1)",
                finished = INTENT.finished
            ))
            .bind(Backend::ago(older_than))
            .execute(&mut *tx)
            .await?;
            let messages = sqlx::query(sql!(
                "DELETE FROM messages WHERE state IN {finished} AND updated_at < @ago($1)",
                finished = MESSAGE.finished
            ))
            .bind(Backend::ago(older_than))
            .execute(&mut *tx)
            .await?;
            // A broadcast's entry (its idempotency key) lives as long as one
            // of its messages does.
            sqlx::query(sql!(
                "DELETE FROM broadcasts WHERE created_at < @ago($1)
                   AND NOT EXISTS (SELECT 1 FROM messages WHERE broadcast_id = broadcasts.id)"
            ))
            .bind(Backend::ago(older_than))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(intents.rows_affected() + messages.rows_affected())
        }

        async fn queue_depths(&self) -> StoreResult<Vec<(String, i64)>> {
            Ok(sqlx::query_as(sql!(
                "SELECT b.name, CAST(count(*) AS BIGINT) FROM brokers b
                 JOIN (SELECT broker_id FROM dispatch_intents WHERE state IN {intents}
                       UNION ALL
                       SELECT broker_id FROM messages WHERE state IN {messages}) w
                   ON w.broker_id = b.id
                 GROUP BY b.name",
                intents = INTENT.unfinished,
                messages = MESSAGE.unfinished,
            ))
            .fetch_all(&self.pool)
            .await?)
        }

        async fn queue_depths_by_agent(&self) -> StoreResult<Vec<QueueDepth>> {
            Ok(sqlx::query_as(sql!(
                "SELECT broker_id, agent_id, CAST(count(*) AS BIGINT) AS depth
                 FROM (SELECT broker_id, agent_id FROM dispatch_intents WHERE state IN {intents}
                       UNION ALL
                       SELECT broker_id, agent_id FROM messages WHERE state IN {messages}) w
                 GROUP BY broker_id, agent_id",
                intents = INTENT.unfinished,
                messages = MESSAGE.unfinished,
            ))
            .fetch_all(&self.pool)
            .await?)
        }

        async fn count_stuck(&self, older_than: Duration) -> StoreResult<u64> {
            let n: i64 = sqlx::query_scalar(sql!(
                "SELECT (SELECT count(*) FROM dispatch_intents
                         WHERE state IN {intents} AND created_at < @ago($1))
                      + (SELECT count(*) FROM messages
                         WHERE state IN {messages} AND created_at < @ago($1))",
                intents = INTENT.unfinished,
                messages = MESSAGE.unfinished,
            ))
            .bind(Backend::ago(older_than))
            .fetch_one(&self.pool)
            .await?;
            Ok(n.max(0) as u64)
        }
    }
}
