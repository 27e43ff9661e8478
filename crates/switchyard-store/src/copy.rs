//! Copying a single-node hub from its SQLite file into PostgreSQL, so that
//! it can go on as a cluster (`switchyard db copy`).
//!
//! The conversion is written once and driven by the target's column types:
//! for each table it reads the columns PostgreSQL has (from
//! `information_schema.columns`), selects the same columns from SQLite and
//! converts each value by its PostgreSQL type (`uuid` from 16 bytes,
//! `timestamp with time zone` from RFC 3339 text, `jsonb` from text,
//! `boolean` from 0/1, ...). One hand-written statement per table would say
//! the same thing ten times and would silently miss a column a later
//! migration adds; this way a new column is copied without a change, a new
//! column type or a new table stops the copy with an error naming it.
//!
//! The copy is idempotent: rows go in with `ON CONFLICT (primary key) DO
//! NOTHING`, batch by batch (one transaction each), and each batch checks
//! that the target holds every one of its rows afterwards. Nothing is held
//! in memory beyond one batch.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::Postgres;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, PgPool, QueryBuilder, Row, SqlitePool, ValueRef};
use uuid::Uuid;

use crate::connect::{Database, OpenError, redact};
use crate::ids::{HubId, ReplicaId};
use crate::model::Replica;
use crate::postgres::PgStore;
use crate::sqlite::SqliteStore;
use crate::store::ReplicaStore;

/// A replica seen this recently is taken to be running: replicas heartbeat
/// every 2 s and are declared dead after 10 s.
const RUNNING_WITHIN: Duration = Duration::from_secs(10);
/// Rows per `INSERT` (at most 65,535 parameters: fine up to 131 columns).
const BATCH_ROWS: i64 = 500;
/// Rows per `INSERT` for a table with a `bytea` column: attachment chunks
/// are up to 1 MiB each.
const BATCH_ROWS_WITH_BYTES: i64 = 4;

/// The tables copied, parents before children (foreign-key order).
const COPIED: &[&str] = &[
    "brokers",
    "agents",
    "admin_tokens",
    "broker_nonces",
    "broadcasts",
    "dispatch_intents",
    "messages",
    "attachments",
    "attachment_chunks",
    "event_log",
];

/// Tables deliberately not copied row by row: the replica registry (the
/// SQLite replica is not part of the cluster), each side's own migration
/// ledger, the hub identity (checked, then taken over), and the event log
/// horizon (merged: the higher `pruned_through` wins).
const NOT_COPIED: &[&str] = &[
    "replicas",
    "_sqlx_migrations",
    "hub_identity",
    "event_log_horizon",
];

/// Copied tables that may hold rows in an "empty" target: the admin token a
/// first `serve` on PostgreSQL stores.
const ALLOWED_IN_EMPTY_TARGET: &[&str] = &["admin_tokens"];

/// Source columns replaced on the way: a broker arrives offline, with no
/// session, since the SQLite replica that held it is not in the cluster.
const OVERRIDES: &[(&str, &str, &str)] = &[
    ("brokers", "status", "'offline'"),
    ("brokers", "connected_replica", "NULL"),
    ("brokers", "session_id", "NULL"),
    ("brokers", "connected_at", "NULL"),
    ("brokers", "last_heartbeat", "NULL"),
];

/// Why a copy did not start or did not finish. One line each, passwords
/// never printed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(
        "unsupported source {url}: use sqlite:///ABSOLUTE/PATH, sqlite://RELATIVE/PATH or file:PATH"
    )]
    UnsupportedSource { url: String },
    #[error("invalid source {url}: {reason}")]
    InvalidSource { url: String, reason: String },
    #[error("source file {path} does not exist")]
    SourceMissing { path: String },
    #[error("the target must be a PostgreSQL URL (postgres://...), not {url}")]
    TargetNotPostgres { url: String },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(
        "a hub is running on {path} (replica {replica} was seen {seconds_ago}s ago): \
         stop the hub first"
    )]
    SourceInUse {
        path: String,
        replica: ReplicaId,
        seconds_ago: i64,
    },
    #[error(
        "a hub is running on the target (replica {replica} was seen {seconds_ago}s ago): \
         stop the cluster first"
    )]
    TargetInUse {
        replica: ReplicaId,
        seconds_ago: i64,
    },
    #[error(
        "the target holds another hub (hub {target}, this source is hub {source_hub}): it has {holds}; \
         copy into an empty database"
    )]
    DifferentHub {
        source_hub: HubId,
        target: HubId,
        holds: String,
    },
    #[error("table {table} of the target is not known to the copy; this switchyard cannot copy it")]
    UnknownTable { table: String },
    #[error("column {table}.{column} has type {data_type}, which the copy cannot convert")]
    UnsupportedColumn {
        table: String,
        column: String,
        data_type: String,
    },
    #[error("cannot convert {table}.{column} of source row {rowid}: {reason}")]
    Value {
        table: String,
        column: String,
        rowid: i64,
        reason: String,
    },
    #[error("reading the source failed: {0}")]
    Source(String),
    #[error("writing the target failed: {0}")]
    Target(String),
    #[error("cannot remove {path}: {reason}")]
    RemoveSource { path: String, reason: String },
}

fn source_err(err: sqlx::Error) -> CopyError {
    CopyError::Source(err.to_string())
}

fn target_err(err: sqlx::Error) -> CopyError {
    CopyError::Target(err.to_string())
}

/// How the target's hub identity was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubOutcome {
    /// The target already is this hub: a copy run again.
    Same(HubId),
    /// The target was empty and took the source's id. `admin_tokens` counts
    /// the tokens it held (a first `serve` stores one); they are kept.
    Adopted {
        hub: HubId,
        previous: HubId,
        admin_tokens: i64,
    },
}

/// What one table's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    pub table: &'static str,
    /// Rows in the source.
    pub source: i64,
    /// Rows this run inserted.
    pub copied: i64,
    /// Source rows the target held before this run.
    pub already_there: i64,
}

impl TableCount {
    /// Source rows the target does not hold after the copy.
    pub fn missing(&self) -> i64 {
        self.source - self.copied - self.already_there
    }
}

/// What a copy did.
#[derive(Debug, Clone)]
pub struct CopyReport {
    pub hub: HubOutcome,
    pub tables: Vec<TableCount>,
    /// The event log horizon of the target after the copy.
    pub pruned_through: i64,
}

impl CopyReport {
    /// The target holds every source row.
    pub fn complete(&self) -> bool {
        self.tables.iter().all(|t| t.missing() == 0)
    }

    /// Rows this run inserted.
    pub fn copied(&self) -> i64 {
        self.tables.iter().map(|t| t.copied).sum()
    }
}

/// A SQLite source and a PostgreSQL target, both migrated, the source
/// checked to be idle.
#[derive(Debug)]
pub struct HubCopy {
    source: SqlitePool,
    source_path: PathBuf,
    target: PgPool,
}

impl HubCopy {
    /// Opens both sides: the source must be an existing SQLite file with no
    /// hub running on it; then both are migrated, as `serve` would.
    pub async fn open(from: &str, to: &str) -> Result<HubCopy, CopyError> {
        let (options, source_path) = source_options(from)?;
        if !to.starts_with("postgres://") && !to.starts_with("postgresql://") {
            return Err(CopyError::TargetNotPostgres { url: redact(to) });
        }
        let source = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|e| OpenError::SqliteFile {
                path: source_path.display().to_string(),
                reason: e.to_string(),
            })?;
        if let Some((replica, seconds_ago)) = running_on_source(&source).await? {
            source.close().await;
            return Err(CopyError::SourceInUse {
                path: source_path.display().to_string(),
                replica,
                seconds_ago,
            });
        }
        let source_db = Database::Sqlite(source);
        source_db.migrate(from).await?;
        let target_db = Database::connect(to).await?;
        target_db.migrate(to).await?;
        let (Database::Sqlite(source), Database::Postgres(target)) = (source_db, target_db) else {
            return Err(CopyError::TargetNotPostgres { url: redact(to) });
        };
        Ok(HubCopy {
            source,
            source_path,
            target,
        })
    }

    /// The SQLite file copied from.
    pub fn source_path(&self) -> &Path {
        &self.source_path
    }

    /// Checks the target's identity, copies every table and merges the
    /// event log horizon. Refuses, writing nothing, a target that has a
    /// replica running or holds another hub.
    pub async fn run(&self) -> Result<CopyReport, CopyError> {
        self.check_tables().await?;
        if let Some((replica, seconds_ago)) = running_on_target(&self.target).await? {
            return Err(CopyError::TargetInUse {
                replica,
                seconds_ago,
            });
        }
        let hub = self.settle_identity().await?;
        let mut tables = Vec::with_capacity(COPIED.len());
        for &table in COPIED {
            tables.push(self.copy_table(table).await?);
        }
        self.advance_sequences().await?;
        let pruned_through = self.merge_horizon().await?;
        Ok(CopyReport {
            hub,
            tables,
            pruned_through,
        })
    }

    /// Closes the source and removes its file with its `-wal` and `-shm`
    /// companions. Call only after a complete copy. Returns what was removed.
    pub async fn remove_source(self) -> Result<Vec<PathBuf>, CopyError> {
        self.source.close().await;
        self.target.close().await;
        let mut removed = Vec::new();
        let main = self.source_path.clone();
        let mut companions = Vec::new();
        for suffix in ["-wal", "-shm"] {
            let mut name = main.clone().into_os_string();
            name.push(suffix);
            companions.push(PathBuf::from(name));
        }
        for path in std::iter::once(main).chain(companions) {
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(CopyError::RemoveSource {
                        path: path.display().to_string(),
                        reason: err.to_string(),
                    });
                }
            }
        }
        Ok(removed)
    }

    /// Every table of the target is either copied or deliberately left out,
    /// so a table a later migration adds is not silently dropped.
    async fn check_tables(&self) -> Result<(), CopyError> {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
             ORDER BY table_name",
        )
        .fetch_all(&self.target)
        .await
        .map_err(target_err)?;
        match tables
            .into_iter()
            .find(|t| !COPIED.contains(&t.as_str()) && !NOT_COPIED.contains(&t.as_str()))
        {
            Some(table) => Err(CopyError::UnknownTable { table }),
            None => Ok(()),
        }
    }

    /// Accepts a target that is this hub already, or an empty one (which
    /// then takes the source's id, in the same transaction as the check).
    async fn settle_identity(&self) -> Result<HubOutcome, CopyError> {
        let source: HubId = sqlx::query_scalar("SELECT hub_id FROM hub_identity")
            .fetch_one(&self.source)
            .await
            .map_err(source_err)?;
        let mut tx = self.target.begin().await.map_err(target_err)?;
        let target: HubId = sqlx::query_scalar("SELECT hub_id FROM hub_identity FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(target_err)?;
        if target == source {
            return Ok(HubOutcome::Same(source));
        }
        let mut holds = Vec::new();
        let mut admin_tokens = 0;
        for &table in COPIED {
            let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT count(*) FROM {}",
                ident(table)
            )))
            .fetch_one(&mut *tx)
            .await
            .map_err(target_err)?;
            if ALLOWED_IN_EMPTY_TARGET.contains(&table) {
                admin_tokens = rows;
            } else if rows > 0 {
                holds.push(format!("{rows} {table}"));
            }
        }
        if !holds.is_empty() {
            return Err(CopyError::DifferentHub {
                source_hub: source,
                target,
                holds: holds.join(", "),
            });
        }
        sqlx::query("UPDATE hub_identity SET hub_id = $1")
            .bind(source)
            .execute(&mut *tx)
            .await
            .map_err(target_err)?;
        tx.commit().await.map_err(target_err)?;
        Ok(HubOutcome::Adopted {
            hub: source,
            previous: target,
            admin_tokens,
        })
    }

    async fn copy_table(&self, table: &'static str) -> Result<TableCount, CopyError> {
        let columns = target_columns(&self.target, table).await?;
        let key = primary_key(&self.target, table).await?;
        let key_at: Vec<usize> = key
            .iter()
            .filter_map(|k| columns.iter().position(|c| &c.name == k))
            .collect();
        let batch = if columns.iter().any(|c| c.ty == PgType::Bytea) {
            BATCH_ROWS_WITH_BYTES
        } else {
            BATCH_ROWS
        };
        let select = format!(
            "SELECT rowid, {} FROM {} WHERE rowid > $1 ORDER BY rowid LIMIT $2",
            columns
                .iter()
                .map(|c| source_expr(table, &c.name))
                .collect::<Vec<_>>()
                .join(", "),
            ident(table)
        );
        let column_list = columns
            .iter()
            .map(|c| ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let key_list = key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
        let mut count = TableCount {
            table,
            source: 0,
            copied: 0,
            already_there: 0,
        };
        let mut after = i64::MIN;
        loop {
            let rows: Vec<SqliteRow> = sqlx::query(AssertSqlSafe(select.clone()))
                .bind(after)
                .bind(batch)
                .fetch_all(&self.source)
                .await
                .map_err(source_err)?;
            let Some(last) = rows.last() else { break };
            after = last.try_get(0).map_err(source_err)?;
            let mut cells = Vec::with_capacity(rows.len());
            for row in &rows {
                let rowid: i64 = row.try_get(0).map_err(source_err)?;
                let values = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| read_cell(row, i + 1, c.ty, table, &c.name, rowid))
                    .collect::<Result<Vec<_>, _>>()?;
                cells.push(values);
            }
            drop(rows);
            let keys: Vec<Vec<Cell>> = cells
                .iter()
                .map(|row| key_at.iter().map(|&i| row[i].clone()).collect())
                .collect();
            let n = cells.len() as i64;
            let mut tx = self.target.begin().await.map_err(target_err)?;
            let mut insert: QueryBuilder<Postgres> =
                QueryBuilder::new(format!("INSERT INTO {} ({column_list}) ", ident(table)));
            insert.push_values(cells, |mut b, row| {
                for cell in row {
                    cell.bind_to(&mut b);
                }
            });
            insert.push(format!(" ON CONFLICT ({key_list}) DO NOTHING"));
            let copied = insert
                .build()
                .execute(&mut *tx)
                .await
                .map_err(target_err)?
                .rows_affected() as i64;
            let mut present: QueryBuilder<Postgres> = QueryBuilder::new(format!(
                "SELECT count(*) FROM {} WHERE ({key_list}) IN ",
                ident(table)
            ));
            present.push_tuples(keys, |mut b, key| {
                for cell in key {
                    cell.bind_to(&mut b);
                }
            });
            let present: i64 = present
                .build_query_scalar()
                .fetch_one(&mut *tx)
                .await
                .map_err(target_err)?;
            tx.commit().await.map_err(target_err)?;
            count.source += n;
            count.copied += copied;
            count.already_there += present - copied;
        }
        Ok(count)
    }

    /// Moves every serial column's sequence past the highest id now in
    /// its table (only ever forward), so the cluster's next id is new.
    async fn advance_sequences(&self) -> Result<(), CopyError> {
        let serials: Vec<(String, String)> = sqlx::query_as(
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND column_default LIKE 'nextval(%'
             ORDER BY table_name, column_name",
        )
        .fetch_all(&self.target)
        .await
        .map_err(target_err)?;
        for (table, column) in serials {
            if !COPIED.contains(&table.as_str()) {
                continue;
            }
            let sequence: Option<String> =
                sqlx::query_scalar("SELECT pg_get_serial_sequence($1, $2)")
                    .bind(ident(&table))
                    .bind(&column)
                    .fetch_one(&self.target)
                    .await
                    .map_err(target_err)?;
            let Some(sequence) = sequence else { continue };
            // `sequence` comes quoted from pg_get_serial_sequence.
            sqlx::query(AssertSqlSafe(format!(
                "SELECT setval($1::regclass, m) FROM (SELECT max({col}) AS m FROM {tab}) t
                 WHERE m > (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
                            FROM {sequence})",
                col = ident(&column),
                tab = ident(&table),
            )))
            .bind(&sequence)
            .fetch_optional(&self.target)
            .await
            .map_err(target_err)?;
        }
        Ok(())
    }

    /// The event log horizon takes the higher of the two: events pruned on
    /// either side are gone.
    async fn merge_horizon(&self) -> Result<i64, CopyError> {
        let source: i64 = sqlx::query_scalar("SELECT pruned_through FROM event_log_horizon")
            .fetch_one(&self.source)
            .await
            .map_err(source_err)?;
        sqlx::query_scalar(
            "UPDATE event_log_horizon SET pruned_through = GREATEST(pruned_through, $1)
             RETURNING pruned_through",
        )
        .bind(source)
        .fetch_one(&self.target)
        .await
        .map_err(target_err)
    }
}

/// The SQLite options and file named by `--from`. sqlx reads
/// `sqlite:///abs`, `sqlite://rel` and `sqlite:rel` itself; `file:PATH` and
/// `file:///abs` (and `file://localhost/abs`) are rewritten to the first
/// forms. The file must exist: opening never creates it.
fn source_options(from: &str) -> Result<(SqliteConnectOptions, PathBuf), CopyError> {
    let url = if from.starts_with("sqlite:") {
        from.to_owned()
    } else if let Some(rest) = from.strip_prefix("file://") {
        let rest = rest.strip_prefix("localhost").unwrap_or(rest);
        if !rest.starts_with('/') {
            return Err(CopyError::UnsupportedSource {
                url: from.to_owned(),
            });
        }
        format!("sqlite://{rest}")
    } else if let Some(rest) = from.strip_prefix("file:") {
        format!("sqlite://{rest}")
    } else {
        return Err(CopyError::UnsupportedSource {
            url: from.to_owned(),
        });
    };
    let options = SqliteConnectOptions::from_str(&url).map_err(|e| CopyError::InvalidSource {
        url: from.to_owned(),
        reason: e.to_string(),
    })?;
    let path = options.get_filename().to_path_buf();
    if path.starts_with("file:sqlx-in-memory") || url.contains("mode=memory") {
        return Err(CopyError::InvalidSource {
            url: from.to_owned(),
            reason: "an in-memory database holds no hub to copy".into(),
        });
    }
    if path.as_os_str().is_empty() || !path.is_file() {
        return Err(CopyError::SourceMissing {
            path: path.display().to_string(),
        });
    }
    let options = options
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(10));
    Ok((options, path))
}

/// The most recently seen replica of the source, if seen within
/// [`RUNNING_WITHIN`]. A file with no `replicas` table yet has none.
async fn running_on_source(pool: &SqlitePool) -> Result<Option<(ReplicaId, i64)>, CopyError> {
    let has_table: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'replicas')",
    )
    .fetch_one(pool)
    .await
    .map_err(source_err)?;
    if !has_table {
        return Ok(None);
    }
    let live = SqliteStore::new(pool.clone())
        .live_replicas(RUNNING_WITHIN)
        .await
        .map_err(|e| CopyError::Source(e.to_string()))?;
    Ok(newest(live))
}

async fn running_on_target(pool: &PgPool) -> Result<Option<(ReplicaId, i64)>, CopyError> {
    let live = PgStore::new(pool.clone())
        .live_replicas(RUNNING_WITHIN)
        .await
        .map_err(|e| CopyError::Target(e.to_string()))?;
    Ok(newest(live))
}

/// The replica seen last, and how many seconds ago.
fn newest(live: Vec<Replica>) -> Option<(ReplicaId, i64)> {
    let now = Utc::now();
    live.into_iter()
        .map(|r| (r.instance_id, (now - r.last_seen).num_seconds().max(0)))
        .min_by_key(|(_, ago)| *ago)
}

/// A double-quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What the source select reads for a column: the column, or the value
/// [`OVERRIDES`] puts in its place.
fn source_expr(table: &str, column: &str) -> String {
    OVERRIDES
        .iter()
        .find(|(t, c, _)| *t == table && *c == column)
        .map_or_else(|| ident(column), |(_, _, value)| (*value).to_owned())
}

/// The PostgreSQL column types the copy converts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgType {
    Uuid,
    Text,
    Jsonb,
    Timestamptz,
    Boolean,
    Integer,
    Bigint,
    Bytea,
}

impl PgType {
    fn from_information_schema(data_type: &str) -> Option<PgType> {
        Some(match data_type {
            "uuid" => PgType::Uuid,
            "text" => PgType::Text,
            "jsonb" => PgType::Jsonb,
            "timestamp with time zone" => PgType::Timestamptz,
            "boolean" => PgType::Boolean,
            "integer" => PgType::Integer,
            "bigint" => PgType::Bigint,
            "bytea" => PgType::Bytea,
            _ => return None,
        })
    }
}

#[derive(Debug)]
struct Column {
    name: String,
    ty: PgType,
}

async fn target_columns(pool: &PgPool, table: &str) -> Result<Vec<Column>, CopyError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = $1
         ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .map_err(target_err)?;
    rows.into_iter()
        .map(
            |(name, data_type)| match PgType::from_information_schema(&data_type) {
                Some(ty) => Ok(Column { name, ty }),
                None => Err(CopyError::UnsupportedColumn {
                    table: table.to_owned(),
                    column: name,
                    data_type,
                }),
            },
        )
        .collect()
}

async fn primary_key(pool: &PgPool, table: &str) -> Result<Vec<String>, CopyError> {
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT k.column_name::text
         FROM information_schema.table_constraints c
         JOIN information_schema.key_column_usage k
           ON k.constraint_name = c.constraint_name AND k.table_schema = c.table_schema
              AND k.table_name = c.table_name
         WHERE c.table_schema = current_schema() AND c.table_name = $1
           AND c.constraint_type = 'PRIMARY KEY'
         ORDER BY k.ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .map_err(target_err)?;
    if key.is_empty() {
        return Err(CopyError::Target(format!(
            "table {table} has no primary key"
        )));
    }
    Ok(key)
}

/// One value on its way to PostgreSQL, typed by its target column (a NULL
/// keeps the column's type too).
#[derive(Debug, Clone)]
enum Cell {
    Uuid(Option<Uuid>),
    Text(Option<String>),
    Jsonb(Option<sqlx::types::Json<serde_json::Value>>),
    Timestamptz(Option<DateTime<Utc>>),
    Boolean(Option<bool>),
    Integer(Option<i32>),
    Bigint(Option<i64>),
    Bytea(Option<Vec<u8>>),
}

impl Cell {
    fn bind_to<Sep: std::fmt::Display>(
        self,
        b: &mut sqlx::query_builder::Separated<'_, Postgres, Sep>,
    ) {
        match self {
            Cell::Uuid(v) => b.push_bind(v),
            Cell::Text(v) => b.push_bind(v),
            Cell::Jsonb(v) => b.push_bind(v),
            Cell::Timestamptz(v) => b.push_bind(v),
            Cell::Boolean(v) => b.push_bind(v),
            Cell::Integer(v) => b.push_bind(v),
            Cell::Bigint(v) => b.push_bind(v),
            Cell::Bytea(v) => b.push_bind(v),
        };
    }
}

/// Reads column `i` of a source row as the PostgreSQL type `ty` wants it.
fn read_cell(
    row: &SqliteRow,
    i: usize,
    ty: PgType,
    table: &str,
    column: &str,
    rowid: i64,
) -> Result<Cell, CopyError> {
    let bad = |reason: String| CopyError::Value {
        table: table.to_owned(),
        column: column.to_owned(),
        rowid,
        reason,
    };
    let null = row
        .try_get_raw(i)
        .map_err(|e| bad(e.to_string()))?
        .is_null();
    let get_err = |e: sqlx::Error| bad(e.to_string());
    Ok(match ty {
        PgType::Uuid => Cell::Uuid(if null {
            None
        } else {
            let bytes: Vec<u8> = row.try_get(i).map_err(get_err)?;
            Some(
                Uuid::from_slice(&bytes)
                    .or_else(|_| Uuid::try_parse_ascii(&bytes))
                    .map_err(|e| bad(e.to_string()))?,
            )
        }),
        PgType::Text => Cell::Text(row.try_get(i).map_err(get_err)?),
        PgType::Jsonb => Cell::Jsonb(if null {
            None
        } else {
            let text: String = row.try_get(i).map_err(get_err)?;
            Some(sqlx::types::Json(
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?,
            ))
        }),
        PgType::Timestamptz => Cell::Timestamptz(row.try_get(i).map_err(get_err)?),
        PgType::Boolean => Cell::Boolean(row.try_get(i).map_err(get_err)?),
        PgType::Integer => Cell::Integer(if null {
            None
        } else {
            let wide: i64 = row.try_get(i).map_err(get_err)?;
            Some(i32::try_from(wide).map_err(|e| bad(e.to_string()))?)
        }),
        PgType::Bigint => Cell::Bigint(row.try_get(i).map_err(get_err)?),
        PgType::Bytea => Cell::Bytea(row.try_get(i).map_err(get_err)?),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_source_form_names_the_same_file_and_a_missing_one_is_not_created() {
        let dir = std::env::temp_dir().join(format!("sy-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hub.db");
        std::fs::write(&file, b"").unwrap();
        let abs = file.display().to_string();
        for form in [
            format!("sqlite://{abs}"),
            format!("sqlite:{abs}"),
            format!("file:{abs}"),
            format!("file://{abs}"),
            format!("file://localhost{abs}"),
        ] {
            let (_, path) = source_options(&form).unwrap();
            assert_eq!(path, file, "{form}");
        }
        let missing = dir.join("missing.db");
        let err = source_options(&format!("file:{}", missing.display())).unwrap_err();
        assert!(matches!(err, CopyError::SourceMissing { .. }), "{err}");
        assert!(!missing.exists());
        for bad in [
            "postgres://x/y",
            "file://host/x.db",
            "hub.db",
            "sqlite::memory:",
        ] {
            assert!(source_options(bad).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
