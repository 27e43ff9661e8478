//! Broker affinity: which replica holds each broker's live session.

use async_trait::async_trait;
use sqlx::Transaction;

use crate::dialect::{BindNow, Dialect, for_each_backend, sql};
use crate::error::{Entity, StoreError, StoreResult};
use crate::ids::{BrokerId, ReplicaId, SessionId};
use crate::model::{Affinity, Broker, SessionHeartbeat, Transport};
use crate::rules::{OFFLINE, ONLINE, POLL};

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
        transport: Transport,
    ) -> StoreResult<Option<Affinity>>;

    /// A poll of `session` arrived at `replica`: if the session is still
    /// the broker's live one, it is held by `replica` from now on (wake-ups
    /// for the broker go there) and its heartbeat is recorded. The broker
    /// row is locked as by [`AffinityStore::claim_affinity`], so an insert
    /// reads either the old holder and commits first, or the new one.
    async fn resume_session(
        &self,
        broker: BrokerId,
        replica: ReplicaId,
        session: SessionId,
    ) -> StoreResult<SessionHeartbeat>;

    /// Clears the affinity of every poll session with no heartbeat for
    /// `older_than` (the broker stopped polling). Socket sessions end with
    /// their socket and are left alone. Returns the brokers released.
    async fn release_lapsed_sessions(
        &self,
        older_than: std::time::Duration,
    ) -> StoreResult<Vec<BrokerId>>;

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
            transport: Transport,
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
                        transport = $4, connected_at = @now, last_heartbeat = @now,
                        updated_at = @now
                 WHERE id = $1",
                online = *ONLINE
            ))
            .bind(broker)
            .bind(replica)
            .bind(session)
            .bind(transport.as_str())
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

        async fn resume_session(
            &self,
            broker: BrokerId,
            replica: ReplicaId,
            session: SessionId,
        ) -> StoreResult<SessionHeartbeat> {
            let mut tx = self.write().await?;
            let live = sqlx::query(sql!(
                "SELECT 1 FROM brokers WHERE id = $1 AND session_id = $2 @for_update"
            ))
            .bind(broker)
            .bind(session)
            .fetch_optional(&mut *tx)
            .await?;
            if live.is_none() {
                return Ok(SessionHeartbeat::Superseded);
            }
            sqlx::query(sql!(
                "UPDATE brokers SET connected_replica = $2, last_heartbeat = @now WHERE id = $1"
            ))
            .bind(broker)
            .bind(replica)
            .bind_now()
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(SessionHeartbeat::Current)
        }

        async fn release_lapsed_sessions(
            &self,
            older_than: std::time::Duration,
        ) -> StoreResult<Vec<BrokerId>> {
            Ok(sqlx::query_scalar(sql!(
                "UPDATE brokers SET status = {offline}, connected_replica = NULL, session_id = NULL,
                        connected_at = NULL, updated_at = @now
                 WHERE transport = {poll} AND session_id IS NOT NULL
                   AND last_heartbeat < @ago($1)
                 RETURNING id",
                offline = *OFFLINE,
                poll = *POLL,
            ))
            .bind(Backend::ago(older_than))
            .bind_now()
            .fetch_all(&self.pool)
            .await?)
        }

        async fn release_replica_affinities(&self, replica: ReplicaId) -> StoreResult<Vec<BrokerId>> {
            let mut tx = self.write().await?;
            let released = Backend::release_all(&mut tx, replica).await?;
            tx.commit().await?;
            Ok(released)
        }
    }
}
