//! The database's own ceiling, measured on the same run: how many rows per
//! second C connections can commit in 50-row INSERTs, and how long one
//! single-row commit takes.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::Executor;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::stats::percentile_ms;

/// How long the batched INSERT phase runs.
const BATCHED_FOR: Duration = Duration::from_secs(3);
const ROWS_PER_INSERT: usize = 50;
const SINGLE_COMMITS: usize = 500;

#[derive(Debug)]
pub(crate) struct Baseline {
    /// Rows per second, C connections committing 50-row INSERTs.
    pub(crate) batched_rows_per_sec: f64,
    /// p50 of one single-row INSERT commit, ms.
    pub(crate) single_commit_p50_ms: f64,
}

/// Runs both measurements on a scratch table that is dropped afterwards.
///
/// The table is a regular (logged) table with a UUID key, a JSON body and a
/// timestamp, like the hub's `messages` rows, so its commits pay the same
/// WAL flush the hub's do; an unlogged table would skip that flush and
/// measure a ceiling no durable write can reach.
pub(crate) async fn measure(url: &str, connections: usize) -> anyhow::Result<Baseline> {
    let options = PgConnectOptions::from_str(url)?.application_name("switchyard-bench-baseline");
    let pool = PgPoolOptions::new()
        .max_connections(connections as u32)
        .min_connections(connections as u32)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("baseline: connecting")?;
    let table = format!("bench_scratch_{}", uuid::Uuid::new_v4().simple());
    pool.execute(sqlx::AssertSqlSafe(format!(
        "create table {table} (id uuid primary key, body jsonb not null, \
         created_at timestamptz not null default now())"
    )))
    .await
    .context("baseline: creating the scratch table")?;
    let result = run(&pool, &table, connections).await;
    pool.execute(sqlx::AssertSqlSafe(format!("drop table if exists {table}")))
        .await
        .ok();
    pool.close().await;
    result
}

async fn run(pool: &sqlx::PgPool, table: &str, connections: usize) -> anyhow::Result<Baseline> {
    // Batched: each connection commits 50-row INSERTs for ~3 s.
    let batch_sql = {
        let values: Vec<String> = (0..ROWS_PER_INSERT)
            .map(|i| format!("(gen_random_uuid(), jsonb_build_object('n', {i}))"))
            .collect();
        format!(
            "insert into {table} (id, body) values {}",
            values.join(", ")
        )
    };
    let start = Instant::now();
    let deadline = start + BATCHED_FOR;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let pool = pool.clone();
        let sql = batch_sql.clone();
        workers.spawn(async move {
            let mut rows = 0u64;
            while Instant::now() < deadline {
                sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&pool)
                    .await?;
                rows += ROWS_PER_INSERT as u64;
            }
            anyhow::Ok(rows)
        });
    }
    let mut rows = 0u64;
    while let Some(joined) = workers.join_next().await {
        rows += joined.context("baseline worker panicked")??;
    }
    let batched_rows_per_sec = rows as f64 / start.elapsed().as_secs_f64();

    // Single-row commits, one connection, one after the other.
    let single_sql = format!("insert into {table} (id, body) values (gen_random_uuid(), '{{}}')");
    let mut conn = pool.acquire().await?;
    let mut samples = Vec::with_capacity(SINGLE_COMMITS);
    for _ in 0..SINGLE_COMMITS {
        let t = Instant::now();
        sqlx::query(sqlx::AssertSqlSafe(single_sql.clone()))
            .execute(&mut *conn)
            .await?;
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    Ok(Baseline {
        batched_rows_per_sec,
        single_commit_p50_ms: percentile_ms(&samples, 50.0),
    })
}
