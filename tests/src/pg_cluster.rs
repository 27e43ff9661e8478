//! A PostgreSQL cluster of a test's own (initdb, pg_ctl; as the `postgres`
//! user when run as root), for what the shared server cannot show: a
//! restart of the server itself, or password authentication (the shared
//! one trusts every local connection).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct Cluster {
    ctl: Ctl,
    superuser: String,
    password: Option<String>,
    _dir: tempfile::TempDir,
}

/// What `pg_ctl` needs to act on a cluster; cheap to clone into a thread.
#[derive(Debug, Clone)]
pub struct Ctl {
    pub data: PathBuf,
    pub port: u16,
}

/// A packaged server binary (`/usr/lib/postgresql/*/bin`), else from PATH.
fn pg_bin(name: &str) -> PathBuf {
    let packaged = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|version| version.path().join("bin").join(name))
        .find(|path| path.exists());
    packaged.unwrap_or_else(|| PathBuf::from(name))
}

/// `program args...`, as the `postgres` user when this process is root
/// (initdb and the server refuse to run as root).
fn as_owner(program: &Path, args: &[&str]) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program).args(args);
        cmd
    } else {
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    }
}

fn run(mut cmd: Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// A cluster whose superuser `postgres` connects without a password.
    pub fn start() -> Cluster {
        Cluster::init("trust", "postgres", None)
    }

    /// A cluster that asks every connection for a password (SCRAM): its
    /// superuser is `user` with `password`, and it has a database `user`.
    pub fn start_with_password(user: &str, password: &str) -> Cluster {
        let cluster = Cluster::init("scram-sha-256", user, Some(password));
        cluster.create_database(user);
        cluster
    }

    /// initdb with the authentication method `auth` for every connection
    /// and the superuser `superuser` (with `password`, if any), then start.
    fn init(auth: &str, superuser: &str, password: Option<&str>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut args = vec![format!("--auth={auth}"), format!("--username={superuser}")];
        if let Some(password) = password {
            let file = dir.path().join("pwfile");
            std::fs::write(&file, format!("{password}\n")).unwrap();
            args.push(format!("--pwfile={}", file.display()));
        }
        // The server's user must own the directory (and reach it).
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status();
        let data_str = data.to_str().unwrap();
        let mut initdb = vec!["-D", data_str, "--no-sync"];
        initdb.extend(args.iter().map(String::as_str));
        run(as_owner(&pg_bin("initdb"), &initdb));
        let cluster = Cluster {
            ctl: Ctl { data, port },
            superuser: superuser.to_owned(),
            password: password.map(str::to_owned),
            _dir: dir,
        };
        cluster.ctl.pg_ctl(&["start"]);
        cluster
    }

    /// Creates the database `name` (as the superuser).
    pub fn create_database(&self, name: &str) {
        let mut psql = Command::new("psql");
        if let Some(password) = &self.password {
            psql.env("PGPASSWORD", password);
        }
        psql.args([
            &format!(
                "postgres://{}@127.0.0.1:{}/postgres",
                self.superuser, self.ctl.port
            ),
            "-c",
            &format!("CREATE DATABASE \"{name}\""),
        ]);
        run(psql);
    }

    pub fn port(&self) -> u16 {
        self.ctl.port
    }

    pub fn data(&self) -> &Path {
        &self.ctl.data
    }

    /// A handle to run `pg_ctl` on this cluster from another thread.
    pub fn ctl(&self) -> Ctl {
        self.ctl.clone()
    }

    /// The URL of `database` as the superuser, without its password.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{database}",
            self.superuser, self.ctl.port
        )
    }
}

impl Ctl {
    /// `pg_ctl ACTION...` with this cluster's port and socket directory,
    /// waiting for it to finish.
    pub fn pg_ctl(&self, action: &[&str]) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.data.display()
        );
        let data = self.data.to_str().unwrap();
        let mut args = vec!["-D", data, "-w", "-t", "60", "-o", &options, "-l"];
        let log = self.data.join("server.log");
        let log = log.to_str().unwrap().to_owned();
        args.push(&log);
        args.extend_from_slice(action);
        run(as_owner(&pg_bin("pg_ctl"), &args));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.ctl.data.to_str().unwrap();
        let _ = as_owner(&pg_bin("pg_ctl"), &["-D", data, "-m", "immediate", "stop"]).output();
    }
}
