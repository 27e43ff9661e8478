//! One replica end to end, as a user runs it: `switchyard serve` and
//! `switchyard broker` as real processes, agents as real `sh` processes,
//! on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_testkit::TestDb;
use switchyard_tests::{
    Api, BrokerProcess, ECHO_AGENT, Server, TOKEN, assert_once_in_order, got_txt, inbox,
    switchyard, wait_inbox,
};

switchyard_testkit::on_both_backends!(
    full_lifecycle_of_a_real_agent,
    thousand_messages_arrive_once_and_in_order,
    broker_killed_and_restarted_mid_stream_loses_and_duplicates_nothing,
    work_queued_while_the_broker_is_offline_is_drained_on_connect,
);

struct Setup {
    _dir: tempfile::TempDir,
    workdir: std::path::PathBuf,
    server: Server,
    api: Api,
    broker_id: String,
    secret: String,
}

async fn setup(db: &TestDb) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("broker");
    std::fs::create_dir_all(&workdir).unwrap();
    let server = Server::start(dir.path(), Some(db.url()));
    let api = Api::new(&server.base, TOKEN);
    let (status, broker) = api
        .call("POST", "/v1/brokers", Some(json!({"name": "edge"})))
        .await;
    assert_eq!(status, 201, "{broker}");
    Setup {
        workdir,
        api,
        broker_id: broker["id"].as_str().unwrap().to_owned(),
        secret: broker["secret"].as_str().unwrap().to_owned(),
        server,
        _dir: dir,
    }
}

impl Setup {
    fn start_broker(&self) -> BrokerProcess {
        BrokerProcess::start(
            &[&self.server.base],
            &self.broker_id,
            &self.secret,
            &self.workdir,
        )
    }

    async fn wait_online(&self) {
        self.api
            .wait_until(
                &format!("/v1/brokers/{}", self.broker_id),
                Duration::from_secs(15),
                |b| b["status"] == "online",
            )
            .await;
    }

    async fn echo_agent(&self, name: &str) -> String {
        self.api.echo_agent(&self.broker_id, name).await
    }

    async fn lifecycle(&self, op: &str, agent: &str) -> Value {
        self.api.lifecycle(op, agent).await
    }

    async fn send(&self, agent: &str, body: Value) -> String {
        self.api.send(agent, body).await
    }

    /// Runs a client command against this hub: exit code, stdout, stderr.
    fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = switchyard(&self.workdir)
            .args(args)
            .env("SWITCHYARD_HUB", &self.server.base)
            .env("SWITCHYARD_TOKEN", TOKEN)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Waits until the agent's inbox holds `n` lines, then returns them.
    async fn inbox_of(&self, agent: &str, n: usize, within: Duration) -> Vec<Value> {
        wait_inbox(&self.workdir, agent, n, within).await
    }
}

async fn full_lifecycle_of_a_real_agent(db: TestDb) {
    let s = setup(&db).await;
    let _broker = s.start_broker();
    s.wait_online().await;
    let agent = s.echo_agent("echo").await;

    let started = s.lifecycle("start", &agent).await;
    assert_eq!(started["phase"], "running", "{started}");
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        ids.push(s.send(&agent, json!(text)).await);
    }
    let lines = s.inbox_of(&agent, 3, Duration::from_secs(10)).await;
    let bodies: Vec<&str> = lines.iter().map(|l| l["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["one", "two", "three"]);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ids
    );
    for id in &ids {
        s.api
            .wait_until(&format!("/v1/messages/{id}"), Duration::from_secs(5), |m| {
                m["state"] == "delivered"
            })
            .await;
    }
    // The agent process got the same lines on stdin.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while got_txt(&s.workdir, &agent).len() < 3 {
        assert!(std::time::Instant::now() < until, "the agent never echoed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got_txt(&s.workdir, &agent), lines);

    let stopped = s.lifecycle("stop", &agent).await;
    assert_eq!(stopped["phase"], "stopped", "{stopped}");
    let restarted = s.lifecycle("start", &agent).await;
    assert_eq!(restarted["phase"], "running");
    let restarted = s.lifecycle("restart", &agent).await;
    assert_eq!(restarted["phase"], "running");
    let deleted = s.lifecycle("delete", &agent).await;
    assert_eq!(deleted["phase"], "deleted", "{deleted}");
    let (status, _) = s.api.call("GET", "/v1/agents/echo", None).await;
    assert_eq!(status, 404, "a deleted agent's name is free");
    let (_, listed) = s.api.call("GET", "/v1/agents", None).await;
    assert_eq!(
        listed,
        json!([]),
        "deleted agents are not listed by default"
    );
    let (_, all) = s
        .api
        .call("GET", "/v1/agents?include_deleted=true", None)
        .await;
    assert_eq!(all[0]["phase"], "deleted");
}

async fn thousand_messages_arrive_once_and_in_order(db: TestDb) {
    let s = setup(&db).await;
    let _broker = s.start_broker();
    s.wait_online().await;
    let agent = s.echo_agent("bulk").await;
    s.lifecycle("start", &agent).await;
    let mut last = String::new();
    for i in 0..1000 {
        last = s.send(&agent, json!(i)).await;
    }
    let lines = s.inbox_of(&agent, 1000, Duration::from_secs(60)).await;
    assert_once_in_order(&lines, 1000);
    s.api
        .wait_until(
            &format!("/v1/messages/{last}"),
            Duration::from_secs(10),
            |m| m["state"] == "delivered",
        )
        .await;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while got_txt(&s.workdir, &agent).len() < 1000 {
        assert!(
            std::time::Instant::now() < until,
            "the agent never echoed all"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got_txt(&s.workdir, &agent), lines);
}

async fn broker_killed_and_restarted_mid_stream_loses_and_duplicates_nothing(db: TestDb) {
    let s = setup(&db).await;
    let broker = s.start_broker();
    s.wait_online().await;
    let agent = s.echo_agent("steady").await;
    s.lifecycle("start", &agent).await;

    let total = 600;
    let api = Api::new(&s.server.base, TOKEN);
    let target = agent.clone();
    let sender = tokio::spawn(async move {
        for i in 0..total {
            api.send(&target, json!(i)).await;
        }
    });
    s.inbox_of(&agent, 150, Duration::from_secs(30)).await;
    broker.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _broker = s.start_broker();
    sender.await.unwrap();

    let lines = s.inbox_of(&agent, total, Duration::from_secs(60)).await;
    // Give any (wrong) redelivery a moment to show up before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines_after = inbox(&s.workdir, &agent);
    assert_eq!(lines_after.len(), lines.len(), "nothing delivered twice");
    assert_once_in_order(&lines_after, total);
    // What the agent process saw is in order and without duplicates too
    // (lines handed over while it was down live only in the inbox).
    let got = got_txt(&s.workdir, &agent);
    let ids: HashSet<&str> = got.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), got.len());
    let bodies: Vec<u64> = got.iter().map(|l| l["body"].as_u64().unwrap()).collect();
    assert!(
        bodies.windows(2).all(|w| w[0] < w[1]),
        "agent saw them in order"
    );
}

async fn work_queued_while_the_broker_is_offline_is_drained_on_connect(db: TestDb) {
    let s = setup(&db).await;
    let agent = s.echo_agent("patient").await;
    let (status, queued) = s
        .api
        .call(
            "POST",
            &format!("/v1/agents/{agent}/start?wait=false"),
            None,
        )
        .await;
    assert_eq!(status, 202);
    for i in 0..3 {
        s.send(&agent, json!(i)).await;
    }
    let dispatch = queued["dispatch_id"].as_str().unwrap();
    let (_, row) = s
        .api
        .call("GET", &format!("/v1/dispatches/{dispatch}"), None)
        .await;
    assert_eq!(row["state"], "pending");

    let _broker = s.start_broker();
    let lines = s.inbox_of(&agent, 3, Duration::from_secs(15)).await;
    assert_once_in_order(&lines, 3);
    s.api
        .wait_until(
            &format!("/v1/dispatches/{dispatch}"),
            Duration::from_secs(10),
            |d| d["state"] == "done",
        )
        .await;
    s.api
        .wait_until(
            &format!("/v1/agents/{agent}"),
            Duration::from_secs(10),
            |a| a["phase"] == "running",
        )
        .await;
}

#[tokio::test]
async fn the_cli_drives_a_broker_and_an_agent() {
    let db = TestDb::sqlite();
    let s = setup(&db).await;
    let cli = |args: &[&str]| s.cli(args);
    let (code, out, err) = cli(&["brokers", "add", "edge-2", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let broker: Value = serde_json::from_str(&out).unwrap();
    let _broker = BrokerProcess::start(
        &[&s.server.base],
        broker["id"].as_str().unwrap(),
        broker["secret"].as_str().unwrap(),
        &s.workdir,
    );
    let (code, out, err) = cli(&["brokers", "ls"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("edge-2"), "{out}");

    let (code, _, err) = cli(&[
        "agents", "create", "cli-echo", "--broker", "edge-2", "--", "sh", "-c", ECHO_AGENT,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = cli(&["agents", "start", "cli-echo"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("running"), "{out}");
    for text in ["a", "b", "c"] {
        let (code, _, err) = cli(&["send", "cli-echo", text]);
        assert_eq!(code, Some(0), "{err}");
    }
    // Bulk: every line of a file, sent in batches, in order.
    let file = s.workdir.join("lines.txt");
    let many: Vec<String> = (0..1200).map(|i| format!("line-{i}")).collect();
    std::fs::write(&file, many.join("\n")).unwrap();
    let (code, out, err) = cli(&["send", "cli-echo", "--file", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1200);
    let (_, agent) = s.api.call("GET", "/v1/agents/cli-echo", None).await;
    let id = agent["id"].as_str().unwrap().to_owned();
    let lines = s.inbox_of(&id, 1203, Duration::from_secs(30)).await;
    let bodies: Vec<&str> = lines.iter().map(|l| l["body"].as_str().unwrap()).collect();
    assert_eq!(bodies[..3], ["a", "b", "c"]);
    assert_eq!(
        bodies[3..],
        many.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );

    let (code, out, err) = cli(&["agents", "stop", "cli-echo"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("stopped"), "{out}");
    let (code, _, err) = cli(&["agents", "rm", "cli-echo"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&["agents", "show", "cli-echo"]);
    assert_eq!(code, Some(3), "not found exits 3: {err}");
    let (code, _, _) = switchyard(&s.workdir)
        .args([
            "agents",
            "ls",
            "--hub",
            &s.server.base,
            "--token",
            "wrong-token-0123",
        ])
        .output()
        .map(|o| (o.status.code(), (), ()))
        .unwrap();
    assert_eq!(code, Some(4), "unauthorized exits 4");
}

/// Two broker processes started with one credential used to take turns
/// forever, each superseding the other every few seconds. Each now notices
/// being superseded again and again, says so, and pauses (30 s, then
/// longer), so the session stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_with_one_credential_stop_taking_turns() {
    let db = TestDb::sqlite();
    let setup = setup(&db).await;
    let other = setup._dir.path().join("other-broker");
    std::fs::create_dir_all(&other).unwrap();
    let _first = setup.start_broker();
    let _second = BrokerProcess::start(
        &[&setup.server.base],
        &setup.broker_id,
        &setup.secret,
        &other,
    );
    setup.wait_online().await;
    // Both back off after a few rounds; then count takeovers for 12 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let path = format!("/v1/brokers/{}", setup.broker_id);
    let mut sessions = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(12);
    while tokio::time::Instant::now() < until {
        let (_, broker) = setup.api.call("GET", &path, None).await;
        let session = broker["session_id"].clone();
        if !session.is_null() && sessions.last() != Some(&session) {
            sessions.push(session);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sessions.len() <= 2,
        "the session changed hands {} times in 12 s",
        sessions.len() - 1
    );
}

/// Agents get a clean environment: nothing of the broker's own environment
/// outside a short allowlist reaches them (not an admin token exported in
/// the broker's shell, not anything else), while the agent's own `env` and
/// the documented facts about it do. The secrets themselves are given as
/// files, so they appear on no command line either.
#[tokio::test]
async fn agents_never_see_the_brokers_credentials() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut serve = switchyard(dir.path());
    serve
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            db.url(),
        ])
        .arg("--admin-token-file")
        .arg(&token_file);
    let server = Server::run(serve);
    let api = Api::new(&server.base, TOKEN);
    let (status, broker) = api
        .call("POST", "/v1/brokers", Some(json!({"name": "edge"})))
        .await;
    assert_eq!(status, 201, "the token from the file is accepted: {broker}");
    let broker_id = broker["id"].as_str().unwrap().to_owned();
    let secret = broker["secret"].as_str().unwrap().to_owned();

    let secret_file = dir.path().join("edge.secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let workdir = dir.path().join("broker");
    std::fs::create_dir_all(&workdir).unwrap();
    let mut cmd = switchyard(&workdir);
    cmd.args(["broker", "--hub", &server.base, "--broker-id", &broker_id])
        .arg("--secret-file")
        .arg(&secret_file)
        .arg("--workdir")
        .arg(&workdir)
        .env("SWITCHYARD_TOKEN", TOKEN)
        .env("SWITCHYARD_TEST_CANARY", "canary-value")
        .env("HOME", "/home-of-the-broker")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    let process = BrokerProcess {
        child: cmd.spawn().unwrap(),
    };
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", process.child.id())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(&secret),
        "the secret is not on the broker's command line"
    );
    api.wait_until(
        &format!("/v1/brokers/{broker_id}"),
        Duration::from_secs(15),
        |b| b["status"] == "online",
    )
    .await;

    let (status, agent) = api
        .call(
            "POST",
            "/v1/agents",
            Some(json!({
                "name": "envdump",
                "broker_id": broker_id,
                "command": ["sh", "-c", "env > env.tmp && mv env.tmp env.txt; exec sleep 60"],
                "env": {"OWN": "mine"},
            })),
        )
        .await;
    assert_eq!(status, 201, "{agent}");
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    let started = api.lifecycle("start", &agent_id).await;
    assert_eq!(started["phase"], "running", "{started}");

    let agent_dir = workdir.join("agents").join(&agent_id);
    let env_file = agent_dir.join("env.txt");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !env_file.exists() {
        assert!(std::time::Instant::now() < until, "the agent never ran env");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&env_file).unwrap();
    let stopped = api.lifecycle("stop", &agent_id).await;
    assert_eq!(stopped["phase"], "stopped", "{stopped}");

    for leaked in [secret.as_str(), TOKEN, "canary-value"] {
        assert!(
            !text.contains(leaked),
            "{leaked:?} reached the agent:\n{text}"
        );
    }
    let vars: std::collections::HashMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars.get("OWN"), Some(&"mine"), "{text}");
    assert_eq!(vars.get("SWITCHYARD_AGENT_ID"), Some(&agent_id.as_str()));
    assert_eq!(vars.get("SWITCHYARD_AGENT_NAME"), Some(&"envdump"));
    let dir_text = agent_dir.to_str().unwrap();
    assert_eq!(vars.get("SWITCHYARD_AGENT_DIR"), Some(&dir_text));
    let inbox_path = agent_dir.join("inbox.jsonl");
    assert_eq!(
        vars.get("SWITCHYARD_INBOX"),
        Some(&inbox_path.to_str().unwrap())
    );
    assert_eq!(
        vars.get("HOME"),
        Some(&"/home-of-the-broker"),
        "allowlisted"
    );
    assert!(vars.contains_key("PATH"), "{text}");
    // What the shell sets for itself is the only thing beyond the list.
    let allowed: HashSet<&str> = switchyard_broker::INHERITED_ENV
        .iter()
        .copied()
        .chain(["OWN", "SWITCHYARD_AGENT_ID", "SWITCHYARD_AGENT_NAME"])
        .chain(["SWITCHYARD_AGENT_DIR", "SWITCHYARD_INBOX"])
        .chain(["PWD", "OLDPWD", "SHLVL", "_"])
        .collect();
    let extra: Vec<&&str> = vars.keys().filter(|k| !allowed.contains(**k)).collect();
    assert!(extra.is_empty(), "unexpected variables {extra:?}:\n{text}");
}

/// The commands for labels, broadcasts, operations and cancel, against a
/// real hub and broker.
#[tokio::test]
async fn the_cli_broadcasts_runs_operations_and_cancels() {
    let db = TestDb::sqlite();
    let s = setup(&db).await;
    let cli = |args: &[&str]| s.cli(args);
    // Queued while the broker is offline, then withdrawn.
    for (name, team) in [("red-1", "red"), ("red-2", "red"), ("blue-1", "blue")] {
        let (code, _, err) = cli(&[
            "agents",
            "create",
            name,
            "--broker",
            "edge",
            "--label",
            &format!("team={team}"),
            "--",
            "sh",
            "-c",
            ECHO_AGENT,
        ]);
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, out, err) = cli(&["send", "red-1", "withdrawn"]);
    assert_eq!(code, Some(0), "{err}");
    let message = out.split_whitespace().next().unwrap().to_owned();
    let (code, out, err) = cli(&["messages", "cancel", &message]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("cancelled"), "{out}");
    let (code, out, err) = cli(&["agents", "start", "red-2", "--no-wait"]);
    assert_eq!(code, Some(0), "{err}");
    let dispatch = out
        .split_whitespace()
        .find(|w| w.len() == 36)
        .unwrap()
        .to_owned();
    let (code, out, err) = cli(&["dispatches", "cancel", &dispatch]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("cancelled"), "{out}");
    let (code, out, err) = cli(&["send", "--selector", "team=red", "to the reds"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("broadcast ") && out.contains("to 2 agent(s)"),
        "{out}"
    );

    let _broker = s.start_broker();
    s.wait_online().await;
    let (_, red1) = s.api.call("GET", "/v1/agents/red-1", None).await;
    let red1 = red1["id"].as_str().unwrap().to_owned();
    let lines = s.inbox_of(&red1, 1, Duration::from_secs(20)).await;
    assert_eq!(
        lines[0]["body"], "to the reds",
        "the withdrawn message never came"
    );
    let (code, out, err) = cli(&["agents", "op", "red-1", "inspect"]);
    assert_eq!(code, Some(0), "{err}");
    let inspect: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inspect["inbox_count"], 1, "{inspect}");
    assert_eq!(
        inspect["phase"], "created",
        "the cancelled start never ran on red-2 either"
    );
    let (code, out, err) = cli(&[
        "agents",
        "op",
        "red-1",
        "files.read",
        "--args",
        r#"{"path": "inbox.jsonl"}"#,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("to the reds"), "{out}");
    let (code, _, err) = cli(&["agents", "op", "red-1", "no.such"]);
    assert_eq!(code, Some(3), "an unknown operation is a not-found: {err}");
    assert!(
        err.contains("unknown operation") && err.contains("dispatch"),
        "{err}"
    );
    let (_, red2) = s.api.call("GET", "/v1/agents/red-2", None).await;
    assert_eq!(red2["phase"], "created", "{red2}");
}
