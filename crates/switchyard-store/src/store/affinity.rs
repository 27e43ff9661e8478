//! Broker affinity: which replica holds each broker's live session.

use async_trait::async_trait;
use sqlx::Transaction;

use crate::dialect::{BindNow, for_each_backend, sql};
use crate::error::{Entity, StoreError, StoreResult};
use crate::ids::{BrokerId, ReplicaId, SessionId};
use crate::model::{Affinity, Broker, SessionHeartbeat};
use crate::rules::{OFFLINE, ONLINE};

/// Keeps each broker's affinity: newest claim wins, and only the holder of
/// the same (replica, session) clears it.
#[async_trait]
pub trait AffinityStore: Send + Sync {
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
}

for_each_backend! {
    impl Backend {
        /// Clears every affinity `replica` holds, within `tx`.
        pub(crate) async fn release_all(
            tx: &mut Transaction<'static, Db>,
            replica: ReplicaId,
        ) -> StoreResult<Vec<BrokerId>> {
            Ok(sqlx::query_scalar(sql!(
                "UPDATE brokers SET status = {offline}, connected_replica = NULL, session_id = NULL,
                        connected_at = NULL, updated_at = @now
                 WHERE connected_replica = $1
                 RETURNING id",
                offline = *OFFLINE
            ))
            .bind(replica)
            .bind_now()
            .fetch_all(&mut **tx)
            .await?)
        }
    }

    #[async_trait]
    impl AffinityStore for Backend {
        async fn claim_affinity(
            &self,
            broker: BrokerId,
            replica: ReplicaId,
            session: SessionId,
        ) -> StoreResult<Option<Affinity>> {
            let mut tx = self.write().await?;
            // Locked until commit: inserts and claims read the holder under
            // a lock this one must wait for (see `Inserted::owner`).
            let previous: Broker =
                sqlx::query_as(sql!("SELECT * FROM brokers WHERE id = $1 @for_update"))
                    .bind(broker)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or(StoreError::NotFound(Entity::Broker))?;
            sqlx::query(sql!(
                "UPDATE brokers SET status = {online}, connected_replica = $2, session_id = $3,
                        connected_at = @now, last_heartbeat = @now, updated_at = @now
                 WHERE id = $1",
                online = *ONLINE
            ))
            .bind(broker)
            .bind(replica)
            .bind(session)
            .bind_now()
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
            let done = sqlx::query(sql!(
                "UPDATE brokers SET status = {offline}, connected_replica = NULL, session_id = NULL,
                        connected_at = NULL, updated_at = @now
                 WHERE id = $1 AND connected_replica = $2 AND session_id = $3",
                offline = *OFFLINE
            ))
            .bind(broker)
            .bind(replica)
            .bind(session)
            .bind_now()
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn heartbeat_session(
            &self,
            broker: BrokerId,
            session: SessionId,
        ) -> StoreResult<SessionHeartbeat> {
            let done = sqlx::query(sql!(
                "UPDATE brokers SET last_heartbeat = @now WHERE id = $1 AND session_id = $2"
            ))
            .bind(broker)
            .bind(session)
            .bind_now()
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
            let released = Backend::release_all(&mut tx, replica).await?;
            tx.commit().await?;
            Ok(released)
        }
    }
}
