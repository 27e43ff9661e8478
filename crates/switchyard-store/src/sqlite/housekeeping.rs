//! The singleton role on SQLite: the only replica holds it.

use async_trait::async_trait;

use crate::error::StoreResult;
use crate::sqlite::SqliteStore;
use crate::store::{HousekeepingDialect, Singleton};

impl HousekeepingDialect for SqliteStore {
    fn contender(&self) -> Box<dyn Singleton> {
        Box::new(OnlyReplica)
    }
}

/// SQLite serves one replica, which is always the singleton.
#[derive(Debug)]
struct OnlyReplica;

#[async_trait]
impl Singleton for OnlyReplica {
    async fn hold(&mut self) -> StoreResult<bool> {
        Ok(true)
    }
}
