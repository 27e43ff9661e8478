//! The singleton role on PostgreSQL: a session-level advisory lock.

use async_trait::async_trait;
use sqlx::{PgPool, Postgres};

use crate::error::StoreResult;
use crate::postgres::PgStore;
use crate::store::{HousekeepingDialect, Singleton};

impl HousekeepingDialect for PgStore {
    fn contender(&self) -> Box<dyn Singleton> {
        Box::new(PgSingleton {
            pool: self.pool.clone(),
            conn: None,
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
