//! The broker registry.

use async_trait::async_trait;

use crate::dialect::{BindNow, for_each_backend, sql};
use crate::error::{Conflict, Entity, StoreError, StoreResult};
use crate::ids::BrokerId;
use crate::model::Broker;
use crate::rules::DELETED;

/// Keeps registered brokers.
#[async_trait]
pub trait BrokerStore: Send + Sync {
    /// Registers a broker. `Conflict` if the name is taken.
    async fn create_broker(
        &self,
        id: BrokerId,
        name: &str,
        secret_hash: &str,
    ) -> StoreResult<Broker>;

    async fn broker(&self, id: BrokerId) -> StoreResult<Broker>;

    async fn broker_by_name(&self, name: &str) -> StoreResult<Broker>;

    /// All brokers, by name.
    async fn list_brokers(&self) -> StoreResult<Vec<Broker>>;

    /// Deregisters a broker with everything that belonged to its deleted
    /// agents. `Conflict` while it is connected or has agents that are not
    /// deleted.
    async fn delete_broker(&self, id: BrokerId) -> StoreResult<()>;
}

for_each_backend! {
    #[async_trait]
    impl BrokerStore for Backend {
        async fn create_broker(
            &self,
            id: BrokerId,
            name: &str,
            secret_hash: &str,
        ) -> StoreResult<Broker> {
            sqlx::query_as(sql!(
                "INSERT INTO brokers (id, name, secret_hash, created_at, updated_at)
                 VALUES ($1, $2, $3, @now, @now) RETURNING *"
            ))
            .bind(id)
            .bind(name)
            .bind(secret_hash)
            .bind_now()
            .fetch_one(&self.pool)
            .await
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::BrokerName(name.to_owned())),
                other => other,
            })
        }

        async fn broker(&self, id: BrokerId) -> StoreResult<Broker> {
            sqlx::query_as(sql!("SELECT * FROM brokers WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(StoreError::NotFound(Entity::Broker))
        }

        async fn broker_by_name(&self, name: &str) -> StoreResult<Broker> {
            sqlx::query_as(sql!("SELECT * FROM brokers WHERE name = $1"))
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(StoreError::NotFound(Entity::Broker))
        }

        async fn list_brokers(&self) -> StoreResult<Vec<Broker>> {
            Ok(sqlx::query_as(sql!("SELECT * FROM brokers ORDER BY name"))
                .fetch_all(&self.pool)
                .await?)
        }

        async fn delete_broker(&self, id: BrokerId) -> StoreResult<()> {
            let mut tx = self.write().await?;
            // Locked, so no session can be claimed until the delete commits.
            let found: Option<Option<uuid::Uuid>> =
                sqlx::query_scalar(sql!("SELECT session_id FROM brokers WHERE id = $1 @for_update"))
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match found {
                None => return Err(StoreError::NotFound(Entity::Broker)),
                Some(Some(_)) => return Err(StoreError::Conflict(Conflict::BrokerConnected)),
                Some(None) => {}
            }
            let live: i64 = sqlx::query_scalar(sql!(
                "SELECT count(*) FROM agents WHERE broker_id = $1 AND phase <> {deleted}",
                deleted = *DELETED
            ))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            if live > 0 {
                return Err(StoreError::Conflict(Conflict::BrokerHasAgents(live)));
            }
            for sql in [
                sql!("DELETE FROM messages WHERE broker_id = $1"),
                sql!("DELETE FROM dispatch_intents WHERE broker_id = $1"),
                sql!("DELETE FROM agents WHERE broker_id = $1"),
                sql!("DELETE FROM brokers WHERE id = $1"),
            ] {
                sqlx::query(sql).bind(id).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        }
    }
}
