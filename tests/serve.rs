//! The `switchyard` binary as an operator runs it: real processes, real
//! sockets on 127.0.0.1, real PostgreSQL and SQLite databases.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::process::Output;
use std::time::{Duration, Instant};

use switchyard_tests::{Server, TOKEN, bin, switchyard};

use switchyard_testkit::TestDb;

fn stderr_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(
        text.lines().count(),
        1,
        "exactly one line on stderr: {text:?}"
    );
    assert!(text.starts_with("error: "), "{text:?}");
    text
}

#[tokio::test]
async fn serve_in_an_empty_directory_is_ready_within_5s_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    bin(); // built (or found) before the clock starts
    let started = Instant::now();
    let server = Server::start(dir.path(), None);
    assert!(
        server
            .wait_for("/healthz", 200, Duration::from_secs(5))
            .await
    );
    assert!(
        server
            .wait_for("/readyz", 200, Duration::from_secs(5))
            .await
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        dir.path().join("switchyard.db").exists(),
        "the default file is created"
    );

    let ready: serde_json::Value = server.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["backend"], "sqlite");

    // No token given on SQLite: one was generated, printed, and works.
    let token = server.generated_token.clone().expect("a generated token");
    let client = reqwest::Client::new();
    let brokers = format!("{}/v1/brokers", server.base);
    assert_eq!(client.get(&brokers).send().await.unwrap().status(), 401);
    let wrong = client
        .get(&brokers)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = client
        .get(&brokers)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("switchyard_build_info{backend=\"sqlite\""),
        "{metrics}"
    );

    let url = format!("sqlite://{}", dir.path().join("switchyard.db").display());
    let store = switchyard_store::open(&url).await.unwrap();
    let live = store.live_replicas(Duration::from_secs(60)).await.unwrap();
    assert_eq!(live.len(), 1, "serve registered its replica");
    assert_eq!(live[0].address, server.base);

    assert!(server.terminate().success());
    let live = store.live_replicas(Duration::from_secs(60)).await.unwrap();
    assert!(live.is_empty(), "a clean shutdown deregisters the replica");
}

#[tokio::test]
async fn serve_on_postgres_is_ready_and_registered() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(db.url()));
    assert!(
        server
            .wait_for("/readyz", 200, Duration::from_secs(5))
            .await
    );
    assert!(
        server
            .wait_for("/healthz", 200, Duration::from_secs(5))
            .await
    );
    let ready: serde_json::Value = server.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["backend"], "postgres");

    let store = switchyard_store::open(db.url()).await.unwrap();
    let live = store.live_replicas(Duration::from_secs(60)).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(
        live[0].instance_id.to_string(),
        ready["instance_id"].as_str().unwrap()
    );
    assert!(
        !dir.path().join("switchyard.db").exists(),
        "no SQLite file on Postgres"
    );
    assert!(server.terminate().success());
}

#[tokio::test]
async fn readyz_answers_503_when_the_database_is_gone() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Some(db.url()));
    assert!(
        server
            .wait_for("/readyz", 200, Duration::from_secs(5))
            .await
    );
    let name = db.url().rsplit('/').next().unwrap().to_owned();
    db.admin_execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
    assert!(
        server
            .wait_for("/readyz", 503, Duration::from_secs(10))
            .await
    );
    let body: serde_json::Value = server.get("/readyz").await.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_ready");
    // Liveness is about the process, not the database.
    assert_eq!(server.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn db_migrate_is_idempotent_on_both_backends() {
    let pg = TestDb::postgres().await;
    let lite = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    // The newest migration's number: one file per version.
    let migrations = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/postgres");
    let latest = std::fs::read_dir(migrations).unwrap().count();
    for url in [pg.url(), lite.url()] {
        for _ in 0..2 {
            let out = switchyard(dir.path())
                .args(["db", "migrate", "--database-url", url])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains(&format!("schema version {latest}")),
                "{stdout}"
            );
        }
    }
}

#[tokio::test]
async fn bad_database_urls_fail_with_one_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    bin(); // built (or found) before the clocks start
    let not_a_dir = dir.path().join("plain-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let cases = [
        ("mysql://root@127.0.0.1/db", "unsupported database URL"),
        ("postgres://user:hunter2@:::/x", "invalid database URL"),
        (
            "postgres://postgres:hunter2@127.0.0.1:1/x",
            "cannot reach database",
        ),
        ("sqlite::memory:", "in-memory"),
        (
            &format!("sqlite://{}/hub.db", not_a_dir.display()),
            "cannot open SQLite file",
        ),
        (
            &format!("sqlite://{}/missing/hub.db", dir.path().display()),
            "cannot open SQLite file",
        ),
    ];
    for (url, expected) in cases {
        for args in [
            &["db", "migrate"][..],
            &["serve", "--listen", "127.0.0.1:0", "--admin-token", TOKEN][..],
        ] {
            let started = Instant::now();
            let out = switchyard(dir.path())
                .args(args)
                .args(["--database-url", url])
                .output()
                .unwrap();
            assert!(!out.status.success(), "{url} must fail");
            let line = stderr_line(&out);
            assert!(line.contains(expected), "{url}: {line}");
            assert!(!line.contains("hunter2"), "passwords never printed: {line}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{url} failed fast"
            );
        }
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "nothing but the plain file: {left:?}");
}

/// Marks the database as migrated by a future version, the way a newer
/// switchyard's migrator would.
async fn pretend_newer_version(url: &str) {
    let db = switchyard_store::Database::connect(url).await.unwrap();
    db.migrate(url).await.unwrap();
    match db {
        switchyard_store::Database::Postgres(pool) => {
            sqlx::query(
                "INSERT INTO _sqlx_migrations \
                 (version, description, success, checksum, execution_time) \
                 VALUES (9999, 'from the future', true, '\\x00'::bytea, 0)",
            )
            .execute(&pool)
            .await
            .unwrap();
        }
        switchyard_store::Database::Sqlite(pool) => {
            sqlx::query(
                "INSERT INTO _sqlx_migrations \
                 (version, description, success, checksum, execution_time) \
                 VALUES (9999, 'from the future', true, X'00', 0)",
            )
            .execute(&pool)
            .await
            .unwrap();
        }
    };
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_version_is_refused_untouched() {
    let pg = TestDb::postgres().await;
    let lite = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    for url in [pg.url(), lite.url()] {
        pretend_newer_version(url).await;
        for args in [
            &["db", "migrate"][..],
            &["serve", "--listen", "127.0.0.1:0", "--admin-token", TOKEN][..],
        ] {
            let out = switchyard(dir.path())
                .args(args)
                .args(["--database-url", url])
                .output()
                .unwrap();
            assert!(!out.status.success());
            let line = stderr_line(&out);
            assert!(line.contains("schema version 9999"), "{line}");
            assert!(line.contains("upgrade switchyard"), "{line}");
        }
        let store = switchyard_store::Database::connect(url)
            .await
            .unwrap()
            .into_store();
        let live = store.live_replicas(Duration::from_secs(60)).await.unwrap();
        assert!(live.is_empty(), "serve refused before registering");
    }
}

#[tokio::test]
async fn postgres_without_an_admin_token_is_refused_before_touching_the_database() {
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let out = switchyard(dir.path())
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            db.url(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("--admin-token"));
    let db = switchyard_store::Database::connect(db.url()).await.unwrap();
    let switchyard_store::Database::Postgres(pool) = db else {
        unreachable!()
    };
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 0, "nothing was migrated");
}
