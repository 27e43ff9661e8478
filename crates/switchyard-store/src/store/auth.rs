//! Credentials: admin token digests and brokers' handshake nonces.

use std::time::Duration;

use async_trait::async_trait;

use crate::dialect::{BindNow, Dialect, for_each_backend, sql};
use crate::error::StoreResult;
use crate::ids::BrokerId;

/// Keeps what authentication checks against.
#[async_trait]
pub trait AuthStore: Send + Sync {
    /// Stores an admin token digest (idempotent).
    async fn add_admin_token(&self, token_hash: &str) -> StoreResult<()>;

    /// Whether any admin token is stored.
    async fn has_admin_tokens(&self) -> StoreResult<bool>;

    /// Whether this digest belongs to a stored admin token.
    async fn admin_token_exists(&self, token_hash: &str) -> StoreResult<bool>;

    /// Records a handshake nonce of `broker`. False if it was seen before
    /// (a replay). Also forgets nonces older than `keep`, which the
    /// handshake's timestamp window already refuses.
    async fn record_nonce(
        &self,
        broker: BrokerId,
        nonce: &str,
        keep: Duration,
    ) -> StoreResult<bool>;
}

for_each_backend! {
    #[async_trait]
    impl AuthStore for Backend {
        async fn add_admin_token(&self, token_hash: &str) -> StoreResult<()> {
            sqlx::query(sql!(
                "INSERT INTO admin_tokens (token_hash, created_at) VALUES ($1, @now)
                 ON CONFLICT DO NOTHING"
            ))
            .bind(token_hash)
            .bind_now()
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn has_admin_tokens(&self) -> StoreResult<bool> {
            Ok(sqlx::query_scalar(sql!("SELECT EXISTS (SELECT 1 FROM admin_tokens)"))
                .fetch_one(&self.pool)
                .await?)
        }

        async fn admin_token_exists(&self, token_hash: &str) -> StoreResult<bool> {
            Ok(sqlx::query_scalar(sql!(
                "SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE token_hash = $1)"
            ))
            .bind(token_hash)
            .fetch_one(&self.pool)
            .await?)
        }

        async fn record_nonce(
            &self,
            broker: BrokerId,
            nonce: &str,
            keep: Duration,
        ) -> StoreResult<bool> {
            let mut tx = self.write().await?;
            sqlx::query(sql!("DELETE FROM broker_nonces WHERE seen_at < @ago($1)"))
                .bind(Backend::ago(keep))
                .execute(&mut *tx)
                .await?;
            let done = sqlx::query(sql!(
                "INSERT INTO broker_nonces (broker_id, nonce, seen_at) VALUES ($1, $2, @now)
                 ON CONFLICT DO NOTHING"
            ))
            .bind(broker)
            .bind(nonce)
            .bind_now()
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(done.rows_affected() == 1)
        }
    }
}
