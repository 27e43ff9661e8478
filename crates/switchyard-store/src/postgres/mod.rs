//! [`crate::Store`] on PostgreSQL: the multi-replica backend.
//!
//! Time comes from the database clock (`now()`), so replicas with skewed
//! clocks agree on liveness, leases and deadlines. The shared statements
//! live with their aggregates in `store/`; this module holds what only
//! PostgreSQL says: the set-based batch insert and claim, the batch ack
//! ([`work`]) and the advisory-lock singleton ([`housekeeping`]).

mod housekeeping;
mod work;

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

use crate::dialect::Dialect;
use crate::error::StoreResult;

/// PostgreSQL implementation of [`crate::Store`].
#[derive(Clone, Debug)]
pub struct PgStore {
    pub(crate) pool: PgPool,
}

impl PgStore {
    /// Wraps a pool whose database is already migrated.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The underlying pool (the command bus listens on it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A transaction for a change of several statements. Rows it must keep
    /// stable are locked by the statements themselves (`@for_update`).
    pub(crate) async fn write(&self) -> StoreResult<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }
}

/// Event-log appends take a transaction-level advisory lock, key "swyd" +
/// 2 (0x7377_7964_0000_0002; the singleton's is "swyd" + 1), held until
/// the append commits.
impl crate::store::EventDialect for PgStore {
    const APPEND_LOCK: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(8320252306993971202)");
    /// On [`crate::EVENT_LOG_CHANNEL`].
    const APPEND_NOTIFY: Option<&'static str> =
        Some("SELECT pg_notify('switchyard_event_log', '')");
}

impl Dialect for PgStore {
    type Ago = f64;
    const NAME: &'static str = "postgres";
    const FOR_UPDATE: &'static str = "FOR UPDATE";
    const FOR_KEY_SHARE: &'static str = "FOR KEY SHARE";

    fn now(_last: usize) -> String {
        "now()".to_owned()
    }

    fn labels_contain(param: &str) -> String {
        // Served by the GIN index agents_labels (jsonb_path_ops).
        format!("labels @> {param}::jsonb")
    }

    fn ago_sql(param: &str) -> String {
        format!("now() - make_interval(secs => {param})")
    }

    fn ago(d: Duration) -> f64 {
        d.as_secs_f64()
    }
}
