//! Process-level test helpers: the real `switchyard` binary as hub
//! replicas and brokers on 127.0.0.1, killed when a test ends, and an
//! authenticated client for their API.
//!
//! The suites live in another package than the binary, so cargo does not
//! build it for them: [`bin`] builds it once per test process.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod pg_cluster;

pub const TOKEN: &str = "test-admin-token-0123456789";

/// The `switchyard` executable, built (or found up to date) by cargo the
/// first time a test asks for it.
///
/// Cargo sets `CARGO` for the tests it runs; the build goes to the same
/// target directory and profile as the tests, so it only links what
/// `cargo test` already compiled. `--locked` keeps it from touching
/// Cargo.lock, as the test run itself does.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_switchyard)
}

fn build_switchyard() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = Command::new(cargo)
        .args([
            "build",
            "--locked",
            "-p",
            "switchyard",
            "--bin",
            "switchyard",
        ])
        .args([
            "--message-format=json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stderr(Stdio::piped())
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "building switchyard failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "switchyard")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the switchyard executable")
}

/// A `switchyard` command with no database settings inherited from the
/// developer's shell.
pub fn switchyard(dir: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("SWITCHYARD_LISTEN")
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .env("SWITCHYARD_LOG", "warn");
    cmd
}

/// A running `switchyard serve`, killed if the test ends early.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub base: String,
    /// The admin token serve generated and printed, if it did.
    pub generated_token: Option<String>,
}

impl Server {
    /// Starts `serve` on a free port and waits for its "listening" line.
    pub fn start(dir: &Path, database_url: Option<&str>) -> Server {
        let mut cmd = switchyard(dir);
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        if let Some(url) = database_url {
            cmd.args(["--database-url", url, "--admin-token", TOKEN]);
        }
        Server::run(cmd)
    }

    /// Runs a `serve` command the caller built (see [`switchyard`]) and
    /// waits for its "listening" line.
    pub fn run(mut cmd: Command) -> Server {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut token = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, t)) = line.split_once("(shown once, stored only as a digest): ") {
                    token = Some(t.to_owned());
                }
                if let Some(url) = line.strip_prefix("switchyard listening on ") {
                    let _ = tx.send((url.to_owned(), token.clone()));
                }
            }
        });
        let (base, generated_token) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("serve printed its address within 5 s");
        Server {
            child,
            base,
            generated_token,
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("{}{path}", self.base)).await.unwrap()
    }

    /// Polls until `path` answers `status` or `within` passes.
    pub async fn wait_for(&self, path: &str, status: u16, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Ok(r) = reqwest::get(format!("{}{path}", self.base)).await
                && r.status().as_u16() == status
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// SIGKILL: the replica gets no chance to deregister or close sockets.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < until, "serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `switchyard broker` process, killed if the test ends early.
#[derive(Debug)]
pub struct BrokerProcess {
    pub child: Child,
}

impl BrokerProcess {
    pub fn start(hubs: &[&str], broker: &str, secret: &str, workdir: &Path) -> BrokerProcess {
        Self::start_with(hubs, broker, secret, workdir, "ws")
    }

    /// A broker on `transport` (`ws`, `poll` or `auto`).
    pub fn start_with(
        hubs: &[&str],
        broker: &str,
        secret: &str,
        workdir: &Path,
        transport: &str,
    ) -> BrokerProcess {
        let mut cmd = switchyard(workdir);
        cmd.args(["broker", "--transport", transport]);
        for hub in hubs {
            cmd.args(["--hub", hub]);
        }
        let child = cmd
            .args(["--broker-id", broker, "--secret", secret])
            .arg("--workdir")
            .arg(workdir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        BrokerProcess { child }
    }

    /// SIGKILL: no goodbye, no cleanup.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Authenticated JSON calls to a hub.
#[derive(Debug)]
pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, token: &str) -> Api {
        Api {
            base: base.to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Defines an agent running [`ECHO_AGENT`]; returns its id.
    pub async fn echo_agent(&self, broker: &str, name: &str) -> String {
        let (status, agent) = self
            .call(
                "POST",
                "/v1/agents",
                Some(serde_json::json!({
                    "name": name,
                    "broker_id": broker,
                    "command": ["sh", "-c", ECHO_AGENT],
                    "env": {"AGENT_NAME": name},
                })),
            )
            .await;
        assert_eq!(status, 201, "{agent}");
        agent["id"].as_str().unwrap().to_owned()
    }

    /// A synchronous lifecycle op (`start`, `stop`, `restart`, `delete`)
    /// that must succeed; returns the agent it answers with.
    pub async fn lifecycle(&self, op: &str, agent: &str) -> Value {
        let (method, path) = match op {
            "delete" => ("DELETE", format!("/v1/agents/{agent}")),
            _ => ("POST", format!("/v1/agents/{agent}/{op}")),
        };
        let (status, body) = self.call(method, &path, None).await;
        assert_eq!(status, 200, "{op}: {body}");
        body
    }

    /// Sends one message that must be accepted; returns its id.
    pub async fn send(&self, agent: &str, body: Value) -> String {
        let (status, sent) = self
            .call(
                "POST",
                &format!("/v1/agents/{agent}/messages"),
                Some(serde_json::json!({ "body": body })),
            )
            .await;
        assert_eq!(status, 202, "{sent}");
        sent["id"].as_str().unwrap().to_owned()
    }

    /// Polls `check` on `path` until it holds or `within` passes.
    pub async fn wait_until(
        &self,
        path: &str,
        within: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + within;
        loop {
            let (_, body) = self.call("GET", path, None).await;
            if check(&body) {
                return body;
            }
            assert!(Instant::now() < until, "{path} never got there: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The `{"id", "body"}` lines of an agent's inbox.
pub fn inbox(workdir: &Path, agent: &str) -> Vec<serde_json::Value> {
    let path = workdir.join("agents").join(agent).join("inbox.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// An agent that appends every line it reads from stdin to got.txt.
pub const ECHO_AGENT: &str = r#"while read l; do echo "$l" >> got.txt; done"#;

pub fn got_txt(workdir: &Path, agent: &str) -> Vec<Value> {
    std::fs::read_to_string(workdir.join("agents").join(agent).join("got.txt"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts that lines carry each id once and bodies 0..n in order.
pub fn assert_once_in_order(lines: &[Value], n: usize) {
    let ids: HashSet<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), lines.len(), "no duplicates");
    let bodies: Vec<u64> = lines.iter().map(|l| l["body"].as_u64().unwrap()).collect();
    assert_eq!(bodies, (0..n as u64).collect::<Vec<_>>(), "all, in order");
}

/// Waits until the agent's inbox holds `n` lines, then returns them.
pub async fn wait_inbox(workdir: &Path, agent: &str, n: usize, within: Duration) -> Vec<Value> {
    let until = Instant::now() + within;
    loop {
        let lines = inbox(workdir, agent);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < until,
            "inbox has {} of {n} lines",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `switchyard serve` replicas on one database (A, and B when `two`), a
/// broker named "edge" registered through A, and its workdir; all removed
/// when dropped.
#[derive(Debug)]
pub struct Setup {
    _dir: tempfile::TempDir,
    pub workdir: PathBuf,
    pub a: Server,
    pub b: Option<Server>,
    pub api: Api,
    pub broker_id: String,
    pub secret: String,
}

impl Setup {
    pub async fn new(db: &switchyard_testkit::TestDb, two: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path().join("broker");
        std::fs::create_dir_all(&workdir).unwrap();
        let a = Server::start(dir.path(), Some(db.url()));
        let b = two.then(|| Server::start(dir.path(), Some(db.url())));
        let api = Api::new(&a.base, TOKEN);
        let (status, broker) = api
            .call(
                "POST",
                "/v1/brokers",
                Some(serde_json::json!({"name": "edge"})),
            )
            .await;
        assert_eq!(status, 201, "{broker}");
        Setup {
            broker_id: broker["id"].as_str().unwrap().to_owned(),
            secret: broker["secret"].as_str().unwrap().to_owned(),
            _dir: dir,
            workdir,
            a,
            b,
            api,
        }
    }

    /// The replica that holds the broker's session in these tests: B if
    /// there is one.
    pub fn owner(&self) -> &Server {
        self.b.as_ref().unwrap_or(&self.a)
    }

    /// Starts the broker process on `hubs` over `transport` (`ws`, `poll`
    /// or `auto`).
    pub fn broker(&self, hubs: &[&str], transport: &str) -> BrokerProcess {
        BrokerProcess::start_with(
            hubs,
            &self.broker_id,
            &self.secret,
            &self.workdir,
            transport,
        )
    }

    /// Waits until the broker is online with a session on `transport`.
    pub async fn online(&self, transport: &str) -> Value {
        self.api
            .wait_until(
                &format!("/v1/brokers/{}", self.broker_id),
                Duration::from_secs(20),
                |row| row["status"] == "online" && row["transport"] == transport,
            )
            .await
    }

    /// Starts the broker process on `hubs` (WebSocket) and waits until its
    /// session is on the first of them.
    pub async fn start_broker(&self, hubs: &[&str]) -> BrokerProcess {
        let broker = self.broker(hubs, "ws");
        let first = if hubs[0] == self.a.base {
            &self.a
        } else {
            self.owner()
        };
        let health: Value = first.get("/healthz").await.json().await.unwrap();
        self.api
            .wait_until(
                &format!("/v1/brokers/{}", self.broker_id),
                Duration::from_secs(20),
                |row| {
                    row["status"] == "online" && row["connected_replica"] == health["instance_id"]
                },
            )
            .await;
        broker
    }
}
