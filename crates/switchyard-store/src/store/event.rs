//! The durable event log: what `GET /v1/events` replays to a client that
//! reconnects with `Last-Event-ID`, on any replica and after restarts.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::QueryBuilder;

use crate::dialect::{Dialect, for_each_backend, sql};
use crate::error::StoreResult;
use crate::model::{EventBounds, LoggedEvent, NewEvent};

/// The PostgreSQL channel an append notifies at its commit, so every
/// replica's reader of the log looks at once (the payload is empty).
pub const EVENT_LOG_CHANNEL: &str = "switchyard_event_log";

/// Most events read by one [`EventStore::events_after`] call.
pub const MAX_EVENTS_PER_READ: u32 = 1000;

/// Keeps the event log.
///
/// Invariant: ids are handed out in commit order. A reader that has seen
/// every event up to id `n` and asks for those after `n` never misses one
/// that commits later with a smaller id (appends are serialized, see
/// [`EventStore::append_events`]), and an id is never reused.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Appends `events` in one transaction, in order. Appends of all
    /// replicas are serialized (on PostgreSQL by a transaction-level
    /// advisory lock taken before the ids are drawn; on SQLite by its one
    /// write lock), which keeps the invariant above.
    async fn append_events(&self, events: &[NewEvent]) -> StoreResult<()>;

    /// Events with an id above `after`, oldest first, at most `limit` (up
    /// to [`MAX_EVENTS_PER_READ`]).
    async fn events_after(&self, after: i64, limit: u32) -> StoreResult<Vec<LoggedEvent>>;

    /// The newest id and the highest id pruned.
    async fn event_bounds(&self) -> StoreResult<EventBounds>;

    /// Deletes events older than `older_than` and raises the pruned
    /// horizon to the highest id deleted. Returns how many went.
    async fn prune_events(&self, older_than: Duration) -> StoreResult<u64>;
}

/// The lock that orders appends, where the backend needs one.
pub(crate) trait EventDialect {
    /// A statement run first in each append transaction, if any.
    const APPEND_LOCK: Option<&'static str>;
    /// A statement run last in each append transaction, if any: tells
    /// other processes at commit that the log grew.
    const APPEND_NOTIFY: Option<&'static str>;
}

for_each_backend! {
    #[async_trait]
    impl EventStore for Backend {
        async fn append_events(&self, events: &[NewEvent]) -> StoreResult<()> {
            if events.is_empty() {
                return Ok(());
            }
            let mut tx = self.write().await?;
            if let Some(lock) = <Backend as EventDialect>::APPEND_LOCK {
                sqlx::query(lock).execute(&mut *tx).await?;
            }
            // A few hundred rows per statement keeps far below both
            // backends' bound-parameter limits (3 per row).
            for chunk in events.chunks(500) {
                let mut insert =
                    QueryBuilder::<Db>::new("INSERT INTO event_log (kind, agent_id, data) ");
                insert.push_values(chunk, |mut row, event| {
                    row.push_bind(event.kind.clone())
                        .push_bind(event.agent_id)
                        .push_bind(event.data.clone());
                });
                insert.build().execute(&mut *tx).await?;
            }
            if let Some(notify) = <Backend as EventDialect>::APPEND_NOTIFY {
                sqlx::query(notify).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        }

        async fn events_after(&self, after: i64, limit: u32) -> StoreResult<Vec<LoggedEvent>> {
            Ok(sqlx::query_as(sql!(
                "SELECT id, kind, agent_id, data FROM event_log
                 WHERE id > $1 ORDER BY id LIMIT $2"
            ))
            .bind(after)
            .bind(i64::from(limit.min(MAX_EVENTS_PER_READ)))
            .fetch_all(&self.pool)
            .await?)
        }

        async fn event_bounds(&self) -> StoreResult<EventBounds> {
            let (last, pruned_through): (Option<i64>, i64) = sqlx::query_as(sql!(
                "SELECT (SELECT max(id) FROM event_log), pruned_through FROM event_log_horizon"
            ))
            .fetch_one(&self.pool)
            .await?;
            Ok(EventBounds {
                last: last.unwrap_or(pruned_through).max(pruned_through),
                pruned_through,
            })
        }

        async fn prune_events(&self, older_than: Duration) -> StoreResult<u64> {
            let mut tx = self.write().await?;
            // Ids follow commit order, so "everything up to the newest
            // expired id" is a prefix and the horizon stays exact.
            let newest_expired: Option<i64> = sqlx::query_scalar(sql!(
                "SELECT max(id) FROM event_log WHERE created_at < @ago($1)"
            ))
            .bind(Backend::ago(older_than))
            .fetch_one(&mut *tx)
            .await?;
            let Some(through) = newest_expired else {
                return Ok(0);
            };
            let gone = sqlx::query(sql!("DELETE FROM event_log WHERE id <= $1"))
                .bind(through)
                .execute(&mut *tx)
                .await?;
            sqlx::query(sql!(
                "UPDATE event_log_horizon SET pruned_through = $1 WHERE pruned_through < $1"
            ))
            .bind(through)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(gone.rows_affected())
        }
    }
}
