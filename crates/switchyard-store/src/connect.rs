//! Opening a database from a URL, and keeping its schema current.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, PgConnection, PgPool, SqlitePool};

use crate::postgres::PgStore;
use crate::sqlite::SqliteStore;
use crate::store::Store;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How long to wait for the database before giving up on a request.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SQLite writer waits for the write lock.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a database could not be opened or migrated. Each message is one
/// line an operator can act on; passwords in URLs are never printed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("unsupported database URL {url}: use postgres://... or sqlite://PATH")]
    UnsupportedScheme { url: String },
    #[error("invalid database URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot reach database {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("cannot open SQLite file {path}: {reason}")]
    SqliteFile { path: String, reason: String },
    #[error(
        "database {url} has schema version {applied}, newer than this switchyard knows \
         (up to {known}); upgrade switchyard instead"
    )]
    NewerSchema {
        url: String,
        applied: i64,
        known: i64,
    },
    #[error("migrating database {url} failed: {reason}")]
    Migrate { url: String, reason: String },
}

/// A connection pool on one of the two supported backends.
#[derive(Clone, Debug)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Removes the password from a URL before it goes into an error or a log.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn reason(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

impl Database {
    /// Connects without touching the schema. A SQLite file is created if
    /// missing (its directory must exist and be writable).
    pub async fn connect(url: &str) -> Result<Self, OpenError> {
        let shown = redact(url);
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url).map_err(|e| OpenError::InvalidUrl {
                url: shown.clone(),
                reason: reason(&e),
            })?;
            // One direct connection first: the pool would retry a refused
            // connection until its acquire timeout and then report only
            // "pool timed out", hiding the cause.
            let probe = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
                .map_err(|e| OpenError::Unreachable {
                    url: shown.clone(),
                    reason: reason(&e),
                })?;
            probe.close().await.ok();
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|e| OpenError::Unreachable {
                    url: shown,
                    reason: reason(&e),
                })?;
            Ok(Database::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| OpenError::InvalidUrl {
                    url: shown.clone(),
                    reason: reason(&e),
                })?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(SQLITE_BUSY_TIMEOUT);
            let path = options.get_filename().display().to_string();
            if path.starts_with("file:sqlx-in-memory") || url.contains("mode=memory") {
                return Err(OpenError::InvalidUrl {
                    url: shown,
                    reason: "an in-memory database would lose everything on restart; \
                             name a file, e.g. sqlite://switchyard.db"
                        .into(),
                });
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|e| OpenError::SqliteFile {
                    path,
                    reason: reason(&e),
                })?;
            Ok(Database::Sqlite(pool))
        } else {
            Err(OpenError::UnsupportedScheme { url: shown })
        }
    }

    /// Applies pending migrations. Idempotent, and safe to run from several
    /// replicas at once (sqlx takes an advisory lock on PostgreSQL). Refuses
    /// a database migrated by a newer version without changing it.
    pub async fn migrate(&self, url: &str) -> Result<(), OpenError> {
        let migrator = self.migrator();
        let result = match self {
            Database::Postgres(pool) => migrator.run(pool).await,
            Database::Sqlite(pool) => migrator.run(pool).await,
        };
        result.map_err(|err| {
            let url = redact(url);
            match err {
                MigrateError::VersionMissing(applied) => OpenError::NewerSchema {
                    url,
                    applied,
                    known: self.latest_version(),
                },
                MigrateError::Execute(e) if is_io(&e) => OpenError::Unreachable {
                    url,
                    reason: reason(&e),
                },
                other => OpenError::Migrate {
                    url,
                    reason: other.to_string(),
                },
            }
        })
    }

    /// The newest schema version this build knows.
    pub fn latest_version(&self) -> i64 {
        self.migrator()
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or_default()
    }

    fn migrator(&self) -> &'static Migrator {
        match self {
            Database::Postgres(_) => &POSTGRES_MIGRATIONS,
            Database::Sqlite(_) => &SQLITE_MIGRATIONS,
        }
    }

    /// The [`Store`] over this pool. Migrate first.
    pub fn into_store(self) -> Arc<dyn Store> {
        match self {
            Database::Postgres(pool) => Arc::new(PgStore::new(pool)),
            Database::Sqlite(pool) => Arc::new(SqliteStore::new(pool)),
        }
    }
}

fn is_io(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    )
}

/// Connects to `url` and applies migrations.
pub async fn open_database(url: &str) -> Result<Database, OpenError> {
    let db = Database::connect(url).await?;
    db.migrate(url).await?;
    Ok(db)
}

/// Connects to `url`, applies migrations, and returns the store.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, OpenError> {
    Ok(open_database(url).await?.into_store())
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://alice:s3cret@db:5432/hub"),
            "postgres://alice:***@db:5432/hub"
        );
        assert_eq!(redact("postgres://alice@db/hub"), "postgres://alice@db/hub");
        assert_eq!(redact("sqlite://switchyard.db"), "sqlite://switchyard.db");
    }
}
