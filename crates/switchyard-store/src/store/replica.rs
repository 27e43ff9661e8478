//! The replica registry: which hub replicas are alive.

use std::time::Duration;

use async_trait::async_trait;

use crate::dialect::{BindNow, Dialect, for_each_backend, sql};
use crate::error::StoreResult;
use crate::ids::{BrokerId, ReplicaId};
use crate::model::Replica;
use crate::rules::OFFLINE;

/// Keeps the registry of hub replicas.
#[async_trait]
pub trait ReplicaStore: Send + Sync {
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
}

for_each_backend! {
    #[async_trait]
    impl ReplicaStore for Backend {
        async fn register_replica(&self, id: ReplicaId, address: &str) -> StoreResult<Replica> {
            Ok(sqlx::query_as(sql!(
                "INSERT INTO replicas (instance_id, address, started_at, last_seen)
                 VALUES ($1, $2, @now, @now)
                 ON CONFLICT (instance_id) DO UPDATE SET address = excluded.address, last_seen = @now
                 RETURNING *"
            ))
            .bind(id)
            .bind(address)
            .bind_now()
            .fetch_one(&self.pool)
            .await?)
        }

        async fn heartbeat_replica(&self, id: ReplicaId) -> StoreResult<bool> {
            let done = sqlx::query(sql!("UPDATE replicas SET last_seen = @now WHERE instance_id = $1"))
                .bind(id)
                .bind_now()
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn live_replicas(&self, stale_after: Duration) -> StoreResult<Vec<Replica>> {
            Ok(sqlx::query_as(sql!(
                "SELECT * FROM replicas WHERE last_seen >= @ago($1) ORDER BY started_at, instance_id"
            ))
            .bind(Backend::ago(stale_after))
            .fetch_all(&self.pool)
            .await?)
        }

        async fn reap_dead_replicas(&self, stale_after: Duration) -> StoreResult<Vec<ReplicaId>> {
            let mut tx = self.write().await?;
            let dead: Vec<ReplicaId> = sqlx::query_scalar(sql!(
                "DELETE FROM replicas WHERE last_seen < @ago($1) RETURNING instance_id"
            ))
            .bind(Backend::ago(stale_after))
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query(sql!(
                "UPDATE brokers SET status = {offline}, connected_replica = NULL, session_id = NULL,
                        connected_at = NULL, updated_at = @now
                 WHERE connected_replica IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.instance_id = connected_replica)",
                offline = *OFFLINE
            ))
            .bind_now()
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(dead)
        }

        async fn deregister_replica(&self, id: ReplicaId) -> StoreResult<Vec<BrokerId>> {
            let mut tx = self.write().await?;
            sqlx::query(sql!("DELETE FROM replicas WHERE instance_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let released = Backend::release_all(&mut tx, id).await?;
            tx.commit().await?;
            Ok(released)
        }
    }
}
