//! `switchyard db copy`: a single-node hub on SQLite, moved into PostgreSQL
//! and carried on by a cluster of three `switchyard serve` replicas, with
//! real broker processes; and the copy's refusals.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_store::{MessageId, ReplicaId};
use switchyard_testkit::TestDb;
use switchyard_tests::{Api, BrokerProcess, Server, assert_once_in_order, switchyard, wait_inbox};

/// The admin token the PostgreSQL replicas are started with: not the one
/// the SQLite hub generated, which must work all the same after the copy.
const CLUSTER_TOKEN: &str = "cluster-admin-token-0123456789";

/// A single-node hub on `dir/NAME.db` (no admin token given: it generates
/// one), with its token and its hub id.
async fn sqlite_hub(dir: &Path, name: &str) -> (Server, Api, String) {
    let mut cmd = switchyard(dir);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
        .arg(sqlite_url(dir, name));
    let server = Server::run(cmd);
    let token = server.generated_token.clone().expect("a generated token");
    let api = Api::new(&server.base, &token);
    let (status, cluster) = api.call("GET", "/v1/cluster", None).await;
    assert_eq!(status, 200, "{cluster}");
    let hub = cluster["hub_id"].as_str().unwrap().to_owned();
    (server, api, hub)
}

fn sqlite_url(dir: &Path, name: &str) -> String {
    format!("sqlite://{}", db_path(dir, name).display())
}

fn db_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.db"))
}

/// A PostgreSQL replica of the cluster.
fn pg_replica(dir: &Path, url: &str) -> Server {
    let mut cmd = switchyard(dir);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--database-url", url])
        .args(["--admin-token", CLUSTER_TOKEN]);
    Server::run(cmd)
}

async fn add_broker(api: &Api, name: &str) -> (String, String) {
    let (status, broker) = api
        .call("POST", "/v1/brokers", Some(json!({ "name": name })))
        .await;
    assert_eq!(status, 201, "{broker}");
    (
        broker["id"].as_str().unwrap().to_owned(),
        broker["secret"].as_str().unwrap().to_owned(),
    )
}

/// `switchyard db copy --from FROM --to TO [extra]` run in `dir`, killed
/// after 60 s.
fn db_copy(dir: &Path, from: &str, to: &str, extra: &[&str]) -> Output {
    let mut child = switchyard(dir)
        .args(["db", "copy", "--from", from, "--to", to])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            child.kill().unwrap();
            panic!("db copy did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    println!(
        "db copy --from {from} {extra:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The per-table lines of a copy's output: table -> (source rows, copied
/// now, already there).
fn counts(out: &Output) -> BTreeMap<String, (u64, u64, u64)> {
    stdout(out)
        .lines()
        .filter_map(|line| {
            let (table, rest) = line.split_once(": ")?;
            let numbers: Vec<u64> = rest
                .split(", ")
                .map(|part| part.split(' ').next()?.parse().ok())
                .collect::<Option<_>>()?;
            match numbers[..] {
                [source, copied, there] => Some((table.to_owned(), (source, copied, there))),
                _ => None,
            }
        })
        .collect()
}

async fn pg_pool(db: &TestDb) -> sqlx::PgPool {
    sqlx::PgPool::connect(db.url()).await.unwrap()
}

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A single-node hub with a broker, an agent, 10 delivered messages, 50
/// queued while the broker is away (the first of them in flight when the
/// hub stopped) and one with a file is copied into PostgreSQL twice (the
/// second run copies nothing); three replicas on PostgreSQL then take the
/// same broker back with its old credentials and deliver the queued
/// messages once, in order, file included, and accept the SQLite hub's
/// admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_hub_copied_to_postgres_goes_on_as_a_cluster_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("broker");
    std::fs::create_dir_all(&workdir).unwrap();
    let (hub, api, hub_id) = sqlite_hub(dir.path(), "single").await;
    let (broker_id, secret) = add_broker(&api, "edge").await;
    let broker = BrokerProcess::start(&[&hub.base], &broker_id, &secret, &workdir);
    let broker_path = format!("/v1/brokers/{broker_id}");
    api.wait_until(&broker_path, Duration::from_secs(20), |b| {
        b["status"] == "online"
    })
    .await;
    let agent = api.echo_agent(&broker_id, "worker").await;
    for n in 0..10 {
        api.send(&agent, json!(n)).await;
    }
    wait_inbox(&workdir, &agent, 10, Duration::from_secs(30)).await;

    broker.kill9();
    api.wait_until(&broker_path, Duration::from_secs(20), |b| {
        b["status"] == "offline"
    })
    .await;
    let mut queued = Vec::new();
    for n in 10..60 {
        queued.push(api.send(&agent, json!(n)).await);
    }
    let form = reqwest::multipart::Form::new()
        .text("message", json!({ "body": 60 }).to_string())
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"moved with the hub".to_vec()).file_name("note.txt"),
        );
    let sent = api
        .http
        .post(format!("{}/v1/agents/{agent}/messages", hub.base))
        .bearer_auth(&api.token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status().as_u16(), 202);
    let health: Value = hub.get("/healthz").await.json().await.unwrap();
    let sqlite_replica = health["instance_id"].as_str().unwrap().to_owned();
    assert!(hub.terminate().success());

    // The hub stopped while the first queued message was in flight.
    {
        let pool = sqlx::SqlitePool::connect(&sqlite_url(dir.path(), "single"))
            .await
            .unwrap();
        let claimer = ReplicaId::from_str(&sqlite_replica).unwrap();
        let done = sqlx::query(
            "UPDATE messages SET state = 'dispatched', claimed_by = $1, attempts = 1,
                 claimed_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')
             WHERE id = $2 AND state = 'pending'",
        )
        .bind(claimer)
        .bind(MessageId::from_str(&queued[0]).unwrap())
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(done.rows_affected(), 1);
        pool.close().await;
    }

    let pg = TestDb::postgres().await;
    let from = sqlite_url(dir.path(), "single");
    let first = db_copy(dir.path(), &from, pg.url(), &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let copied = counts(&first);
    assert_eq!(copied["brokers"], (1, 1, 0));
    assert_eq!(copied["agents"], (1, 1, 0));
    assert_eq!(copied["messages"], (61, 61, 0));
    assert_eq!(copied["attachments"], (1, 1, 0));
    assert_eq!(copied["attachment_chunks"], (1, 1, 0));
    assert!(copied["admin_tokens"].0 >= 1);
    assert!(copied["event_log"].0 > 0, "the hub logged events");
    assert!(copied.values().all(|(s, c, t)| s == c && *t == 0));
    assert!(stdout(&first).contains(&format!("takes hub id {hub_id}")));

    let second = db_copy(dir.path(), &from, pg.url(), &[]);
    assert!(second.status.success(), "{}", stderr(&second));
    let again = counts(&second);
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        copied.keys().collect::<Vec<_>>()
    );
    for (table, (source, _, _)) in &copied {
        assert_eq!(again[table], (*source, 0, *source), "{table}");
    }
    assert!(stdout(&second).contains("nothing new to copy"));

    let replicas: Vec<Server> = (0..3).map(|_| pg_replica(dir.path(), pg.url())).collect();
    let old_token = Api::new(&replicas[2].base, &api.token);
    let (status, cluster) = old_token.call("GET", "/v1/cluster", None).await;
    assert_eq!(status, 200, "the SQLite hub's admin token works: {cluster}");
    assert_eq!(
        cluster["hub_id"],
        hub_id.as_str(),
        "the cluster is the same hub"
    );
    let (_, row) = old_token.call("GET", &broker_path, None).await;
    assert_eq!(
        row["status"], "offline",
        "copied without its session: {row}"
    );

    let _broker = BrokerProcess::start(&[&replicas[1].base], &broker_id, &secret, &workdir);
    old_token
        .wait_until(&broker_path, Duration::from_secs(20), |b| {
            b["status"] == "online"
        })
        .await;
    let lines = wait_inbox(&workdir, &agent, 61, Duration::from_secs(60)).await;
    assert_once_in_order(&lines, 61);
    let note = std::fs::read(workdir.join("agents").join(&agent).join("files/note.txt")).unwrap();
    assert_eq!(note, b"moved with the hub");
    old_token
        .wait_until(
            &format!("/v1/messages/{}", queued[0]),
            Duration::from_secs(10),
            |m| m["state"] == "delivered",
        )
        .await;

    // Events the cluster logged after the copy got ids of their own.
    let pool = pg_pool(&pg).await;
    let logged = count(&pool, "event_log").await;
    assert!(
        logged > copied["event_log"].0 as i64,
        "{logged} events after the copy"
    );
    pool.close().await;
}

/// A target holding another hub is refused with both ids and nothing
/// written; so are a source a hub is running on, a target a cluster is
/// running on, and a missing source file (which is not created). Every accepted URL form names the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_refuses_another_hubs_target_running_hubs_and_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let pg = TestDb::postgres().await;

    let (one, api_one, hub_one) = sqlite_hub(dir.path(), "one").await;
    add_broker(&api_one, "first").await;
    let running = db_copy(dir.path(), &sqlite_url(dir.path(), "one"), pg.url(), &[]);
    assert!(!running.status.success());
    assert!(
        stderr(&running).contains("stop the hub first"),
        "{}",
        stderr(&running)
    );
    assert!(one.terminate().success());
    let pool = pg_pool(&pg).await;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 0, "the target was not touched");

    // A PostgreSQL hub whose first serve stored its admin token counts as
    // empty.
    let first_serve = pg_replica(dir.path(), pg.url());
    let busy = db_copy(dir.path(), &sqlite_url(dir.path(), "one"), pg.url(), &[]);
    assert!(!busy.status.success());
    assert!(
        stderr(&busy).contains("stop the cluster first"),
        "{}",
        stderr(&busy)
    );
    assert!(first_serve.terminate().success());
    let copied = db_copy(dir.path(), &sqlite_url(dir.path(), "one"), pg.url(), &[]);
    assert!(copied.status.success(), "{}", stderr(&copied));
    assert!(
        stdout(&copied).contains("1 admin token(s)"),
        "{}",
        stdout(&copied)
    );

    let (two, api_two, hub_two) = sqlite_hub(dir.path(), "two").await;
    add_broker(&api_two, "second").await;
    assert!(two.terminate().success());
    let refused = db_copy(dir.path(), &sqlite_url(dir.path(), "two"), pg.url(), &[]);
    assert!(!refused.status.success());
    let why = stderr(&refused);
    assert!(why.contains(&hub_one) && why.contains(&hub_two), "{why}");
    assert!(why.contains("1 brokers"), "{why}");
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM brokers")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(names, ["first"], "nothing of the other hub was written");
    let hub: String = sqlx::query_scalar("SELECT hub_id::text FROM hub_identity")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(hub, hub_one);

    let missing = dir.path().join("missing.db");
    let out = db_copy(dir.path(), "sqlite://missing.db", pg.url(), &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!missing.exists(), "no file was created");
    assert!(!dir.path().join("missing.db-wal").exists());

    let abs = db_path(dir.path(), "one").display().to_string();
    for form in [
        format!("sqlite://{abs}"),
        "sqlite://one.db".to_owned(),
        "file:one.db".to_owned(),
        format!("file://{abs}"),
    ] {
        let out = db_copy(dir.path(), &form, pg.url(), &[]);
        assert!(out.status.success(), "{form}: {}", stderr(&out));
        assert!(stdout(&out).contains("nothing new to copy"), "{form}");
    }
    pool.close().await;
}

/// `--remove-source` keeps the file when the copy is refused, and removes
/// it with its -wal and -shm companions after a complete copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_source_removes_the_file_only_after_a_complete_copy() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TestDb::postgres().await;
    let (other, api_other, _) = sqlite_hub(dir.path(), "other").await;
    add_broker(&api_other, "elsewhere").await;
    assert!(other.terminate().success());
    let out = db_copy(
        dir.path(),
        &sqlite_url(dir.path(), "other"),
        taken.url(),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let (hub, api, _) = sqlite_hub(dir.path(), "moving").await;
    add_broker(&api, "edge").await;
    assert!(hub.terminate().success());
    let from = sqlite_url(dir.path(), "moving");
    let file = db_path(dir.path(), "moving");
    let refused = db_copy(dir.path(), &from, taken.url(), &["--remove-source"]);
    assert!(!refused.status.success());
    assert!(file.exists(), "a refused copy keeps the source");

    let pg = TestDb::postgres().await;
    let moved = db_copy(dir.path(), &from, pg.url(), &["--remove-source"]);
    assert!(moved.status.success(), "{}", stderr(&moved));
    assert!(
        stdout(&moved).contains(&format!("removed {}", file.display())),
        "{}",
        stdout(&moved)
    );
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", file.display()));
        assert!(!path.exists(), "{} is gone", path.display());
    }
    let pool = pg_pool(&pg).await;
    assert_eq!(count(&pool, "brokers").await, 1);
    pool.close().await;
}
