//! [`crate::Store`] on an embedded SQLite file: the single-node backend.
//!
//! Every writing transaction starts with `BEGIN IMMEDIATE`, which takes
//! SQLite's one write lock up front. Writers are therefore serialized, which
//! is what makes claims exactly-once here (and avoids the `SQLITE_BUSY` a
//! deferred transaction gets when it upgrades from reading to writing).
//! Time comes from this process's clock: there is only one replica. The
//! shared statements live with their aggregates in `store/`; this module
//! holds what only SQLite says: the row-by-row batch insert, the claim and
//! the batch ack ([`work`]) and the singleton ([`housekeeping`]).

mod housekeeping;
mod work;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Sqlite, SqlitePool, Transaction};

use crate::dialect::Dialect;
use crate::error::StoreResult;

/// SQLite implementation of [`crate::Store`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
}

impl SqliteStore {
    /// Wraps a pool whose database is already migrated.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// A transaction holding the write lock from its start.
    pub(crate) async fn write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Every write transaction holds SQLite's one write lock from its start
/// (`BEGIN IMMEDIATE`): appends are already serialized.
impl crate::store::EventDialect for SqliteStore {
    const APPEND_LOCK: Option<&'static str> = None;
    /// One process: the hub wakes its own reader.
    const APPEND_NOTIFY: Option<&'static str> = None;
}

impl Dialect for SqliteStore {
    type Ago = DateTime<Utc>;
    const NAME: &'static str = "sqlite";
    /// The write lock covers every row.
    const FOR_UPDATE: &'static str = "";
    const FOR_KEY_SHARE: &'static str = "";

    fn now(last: usize) -> String {
        format!("${}", last + 1)
    }

    fn labels_contain(param: &str) -> String {
        // Label keys are plain words (checked by the API), so they can be
        // quoted into a JSON path as they are.
        format!(
            "NOT EXISTS (SELECT 1 FROM json_each({param}) AS want
                         WHERE json_extract(labels, '$.\"' || want.key || '\"') IS NOT want.value)"
        )
    }

    fn ago_sql(param: &str) -> String {
        param.to_owned()
    }

    fn ago(d: Duration) -> DateTime<Utc> {
        Utc::now() - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
    }
}
