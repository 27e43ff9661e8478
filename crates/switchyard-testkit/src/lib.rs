#![doc = include_str!("../README.md")]

pub mod broker;
pub mod poll;
pub mod proxy;

pub use broker::RawBroker;
pub use proxy::TcpProxy;

use std::future::Future;
use std::path::{Path, PathBuf};

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// Runs each named `async fn(T)` as two tests, `postgres::NAME` and
/// `sqlite::NAME`, each on a fresh database of its own, turned into `T` by
/// [`FromTestDb`] (a plain [`TestDb`], or a suite's own fixture). An
/// optional leading `worker_threads = N;` sizes the runtime (default 2).
/// The calling crate needs `tokio` (with `macros`) as a dependency.
/// For example `on_both_backends!(worker_threads = 4; first_test, second_test);`.
#[macro_export]
macro_rules! on_both_backends {
    (worker_threads = $threads:tt; $($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
                async fn $name() {
                    $crate::run_on($crate::TestDb::postgres().await, super::$name).await;
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
                async fn $name() {
                    $crate::run_on($crate::TestDb::sqlite(), super::$name).await;
                }
            )+
        }
    };
    ($($name:ident),+ $(,)?) => {
        $crate::on_both_backends!(worker_threads = 2; $($name),+);
    };
}

/// What a test written for [`on_both_backends!`] takes: built from the
/// fresh database before the test body runs.
pub trait FromTestDb: Sized {
    /// Builds the test's input from its database.
    fn from_test_db(db: TestDb) -> impl Future<Output = Self>;
}

impl FromTestDb for TestDb {
    async fn from_test_db(db: TestDb) -> Self {
        db
    }
}

/// Runs `test` on the input built from `db`. Used by [`on_both_backends!`]:
/// the test function's parameter type picks the [`FromTestDb`] impl.
#[doc(hidden)]
pub async fn run_on<T, F>(db: TestDb, test: impl FnOnce(T) -> F)
where
    T: FromTestDb,
    F: Future<Output = ()>,
{
    test(T::from_test_db(db).await).await;
}

/// Server used when neither variable is set: the local cluster that
/// `scripts/test.sh` starts or finds.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The admin URL of the test PostgreSQL server.
pub fn admin_url() -> String {
    std::env::var("SWITCHYARD_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .ok()
        .filter(|u| u.starts_with("postgres"))
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_owned())
}

/// One test's database. Dropping it removes the database.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    cleanup: Cleanup,
}

#[derive(Debug)]
enum Cleanup {
    Postgres {
        admin_url: String,
        name: String,
    },
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
}

impl TestDb {
    /// A fresh, empty PostgreSQL database (no migrations applied).
    pub async fn postgres() -> TestDb {
        let admin_url = admin_url();
        let name = format!("switchyard_test_{}", Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach the test PostgreSQL at {admin_url}: {e}\n\
                 run the tests through scripts/test.sh, which starts one"
            )
        });
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let url = with_database(&admin_url, &name);
        TestDb {
            url,
            cleanup: Cleanup::Postgres { admin_url, name },
        }
    }

    /// A fresh SQLite file in its own temporary directory (not created yet).
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("switchyard.db");
        TestDb {
            url: format!("sqlite://{}", path.display()),
            cleanup: Cleanup::Sqlite { _dir: dir, path },
        }
    }

    /// The database URL to hand to the code under test.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The SQLite file, if this is a SQLite database.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.cleanup {
            Cleanup::Sqlite { path, .. } => Some(path),
            Cleanup::Postgres { .. } => None,
        }
    }

    /// Runs one SQL statement as the server's admin, e.g. to kill a session
    /// with `pg_terminate_backend` in a fault test. PostgreSQL only.
    pub async fn admin_execute(&self, sql: String) -> Result<(), sqlx::Error> {
        let Cleanup::Postgres { admin_url, .. } = &self.cleanup else {
            panic!("admin_execute needs a PostgreSQL test database");
        };
        let mut conn = PgConnection::connect(admin_url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await?;
        conn.close().await
    }
}

/// `admin_url` with its database path replaced by `name`.
fn with_database(admin_url: &str, name: &str) -> String {
    let mut url = url::Url::parse(admin_url).expect("admin URL parses");
    url.set_path(name);
    url.to_string()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Cleanup::Postgres { admin_url, name } = &self.cleanup else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot be blocked on
        // from within; a short-lived thread with its own runtime can.
        let (admin_url, name) = (admin_url.clone(), name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut conn = PgConnection::connect(&admin_url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("warning: could not drop test database: {e}");
        }
    }
}
