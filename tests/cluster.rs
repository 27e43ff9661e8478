//! Many replicas on one PostgreSQL: `switchyard serve` processes, a real
//! `switchyard broker`, real `sh` agents, and faults injected from outside
//! (SIGKILL, pg_terminate_backend, a cut TCP connection).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_testkit::{TcpProxy, TestDb};
use switchyard_tests::{Api, BrokerProcess, Server, TOKEN, assert_once_in_order, inbox};

struct Cluster {
    db: TestDb,
    _dir: tempfile::TempDir,
    workdir: PathBuf,
    broker_id: String,
    secret: String,
}

impl Cluster {
    async fn new() -> Cluster {
        let db = TestDb::postgres().await;
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path().join("broker");
        std::fs::create_dir_all(&workdir).unwrap();
        Cluster {
            db,
            _dir: dir,
            workdir,
            broker_id: String::new(),
            secret: String::new(),
        }
    }

    fn replica(&self, url: &str) -> Server {
        Server::start(self.workdir.parent().unwrap(), Some(url))
    }

    async fn register_broker(&mut self, api: &Api) {
        let (status, broker) = api
            .call("POST", "/v1/brokers", Some(json!({"name": "edge"})))
            .await;
        assert_eq!(status, 201, "{broker}");
        self.broker_id = broker["id"].as_str().unwrap().to_owned();
        self.secret = broker["secret"].as_str().unwrap().to_owned();
    }

    fn broker(&self, hubs: &[&str]) -> BrokerProcess {
        BrokerProcess::start(hubs, &self.broker_id, &self.secret, &self.workdir)
    }

    async fn online_at(&self, api: &Api, replica: &Server) {
        let health: Value = replica.get("/healthz").await.json().await.unwrap();
        let instance = health["instance_id"].clone();
        api.wait_until(
            &format!("/v1/brokers/{}", self.broker_id),
            Duration::from_secs(20),
            |b| b["status"] == "online" && b["connected_replica"] == instance,
        )
        .await;
    }

    async fn echo_agent(&self, api: &Api, name: &str) -> String {
        api.echo_agent(&self.broker_id, name).await
    }

    async fn wait_inbox(&self, agent: &str, n: usize, within: Duration) -> Vec<Value> {
        switchyard_tests::wait_inbox(&self.workdir, agent, n, within).await
    }
}

/// Sends bodies `range` to the agent, alternating between the given hubs.
async fn send_range(apis: &[&Api], agent: &str, range: std::ops::Range<u64>) {
    for i in range {
        apis[i as usize % apis.len()].send(agent, json!(i)).await;
    }
}

/// Sum of a metric's samples in Prometheus text.
async fn metric(replica: &Server, name: &str) -> f64 {
    let text = replica.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_on_a_works_for_a_broker_on_b() {
    let mut c = Cluster::new().await;
    let a = c.replica(c.db.url());
    let b = c.replica(c.db.url());
    let api_a = Api::new(&a.base, TOKEN);
    c.register_broker(&api_a).await;
    let _broker = c.broker(&[&b.base]);
    c.online_at(&api_a, &b).await;

    let agent = c.echo_agent(&api_a, "remote").await;
    let started = api_a.lifecycle("start", &agent).await;
    assert_eq!(started["phase"], "running");
    send_range(&[&api_a], &agent, 0..1000).await;
    let lines = c.wait_inbox(&agent, 1000, Duration::from_secs(60)).await;
    assert_once_in_order(&lines, 1000);
    assert_eq!(api_a.lifecycle("stop", &agent).await["phase"], "stopped");
    assert_eq!(api_a.lifecycle("restart", &agent).await["phase"], "running");
    assert_eq!(api_a.lifecycle("delete", &agent).await["phase"], "deleted");

    // A forwarded everything, and coalesced its wake-ups.
    assert!(metric(&a, "switchyard_routes_total{route=\"forward\"}").await >= 1000.0);
    assert_eq!(
        metric(&a, "switchyard_routes_total{route=\"local\"}").await,
        0.0
    );
    let notifies = metric(&a, "switchyard_notifications_sent_total").await;
    println!("notifications sent by A for 1000 messages + 5 ops: {notifies}");
    assert!(
        notifies <= 1010.0,
        "at most one NOTIFY per call: {notifies}"
    );
    let (_, cluster) = api_a.call("GET", "/v1/cluster", None).await;
    let replicas = cluster["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2);
    let holders: Vec<usize> = replicas
        .iter()
        .map(|r| r["brokers"].as_array().unwrap().len())
        .collect();
    assert_eq!(holders.iter().sum::<usize>(), 1, "{cluster}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_moves_from_b_to_a_mid_stream_and_b_is_killed() {
    let mut c = Cluster::new().await;
    let a = c.replica(c.db.url());
    let b = c.replica(c.db.url());
    let api_a = Api::new(&a.base, TOKEN);
    let api_b = Api::new(&b.base, TOKEN);
    c.register_broker(&api_a).await;
    let _broker = c.broker(&[&b.base, &a.base]);
    c.online_at(&api_a, &b).await;
    let agent = c.echo_agent(&api_a, "mover").await;
    api_b.lifecycle("start", &agent).await;

    send_range(&[&api_a, &api_b], &agent, 0..200).await;
    c.wait_inbox(&agent, 50, Duration::from_secs(30)).await;
    // B dies without a goodbye while it holds the socket and claimed work.
    b.kill9();
    send_range(&[&api_a], &agent, 200..400).await;
    c.online_at(&api_a, &a).await;
    let lines = c.wait_inbox(&agent, 400, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        inbox(&c.workdir, &agent).len(),
        lines.len(),
        "no late duplicates"
    );
    assert_once_in_order(&lines, 400);

    // B's registry row is reaped once its heartbeat is stale (10 s).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, cluster) = api_a.call("GET", "/v1/cluster", None).await;
        let replicas = cluster["replicas"].as_array().unwrap();
        if replicas.len() == 1 {
            assert_eq!(replicas[0]["address"], json!(a.base));
            break;
        }
        assert!(
            Instant::now() < until,
            "B never left the cluster: {cluster}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listeners_and_a_cut_database_connection_lose_nothing() {
    let mut c = Cluster::new().await;
    let target = {
        let url = url::Url::parse(c.db.url()).unwrap();
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
            .parse()
            .unwrap()
    };
    let proxy = TcpProxy::start(target).await.unwrap();
    let mut proxied = url::Url::parse(c.db.url()).unwrap();
    proxied.set_port(Some(proxy.addr().port())).unwrap();
    // A reaches PostgreSQL through the proxy; B directly. The broker is on B.
    let a = c.replica(proxied.as_str());
    let b = c.replica(c.db.url());
    let api_a = Api::new(&a.base, TOKEN);
    c.register_broker(&api_a).await;
    let _broker = c.broker(&[&b.base]);
    c.online_at(&api_a, &b).await;
    let agent = c.echo_agent(&api_a, "resilient").await;
    api_a.lifecycle("start", &agent).await;
    send_range(&[&api_a], &agent, 0..100).await;
    c.wait_inbox(&agent, 100, Duration::from_secs(30)).await;

    // Kill every listener connection of this database mid-traffic.
    let name = url::Url::parse(c.db.url())
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_owned();
    let killed_at = Instant::now();
    c.db.admin_execute(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND application_name = 'switchyard-listener'"
    ))
    .await
    .unwrap();
    send_range(&[&api_a], &agent, 100..101).await;
    c.wait_inbox(&agent, 101, Duration::from_secs(30)).await;
    println!(
        "killed listener -> next message delivered in {} ms",
        killed_at.elapsed().as_millis()
    );
    send_range(&[&api_a], &agent, 101..200).await;
    c.wait_inbox(&agent, 200, Duration::from_secs(30)).await;
    let until = Instant::now() + Duration::from_secs(15);
    while metric(&b, "switchyard_command_bus_reconnects_total").await < 1.0 {
        assert!(
            Instant::now() < until,
            "B's listener reconnect was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Cut A's database connections for 3 s while calls keep coming.
    let sender_api = Api::new(&a.base, TOKEN);
    let target_agent = agent.clone();
    let sender = tokio::spawn(async move {
        let (mut accepted, mut unknown) = (Vec::new(), Vec::new());
        for i in 200..300u64 {
            let (status, _) = sender_api
                .call(
                    "POST",
                    &format!("/v1/agents/{target_agent}/messages"),
                    Some(json!({ "body": i })),
                )
                .await;
            match status {
                202 => accepted.push(i),
                500..=599 => unknown.push(i),
                other => panic!("message {i} answered {other}"),
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        (accepted, unknown)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    let (accepted, unknown) = sender.await.unwrap();
    assert!(!unknown.is_empty(), "some calls failed during the cut");
    // Whatever A accepted (202 = committed) is delivered, once, in order.
    // A 5xx says the outcome is unknown, not that nothing was written: the
    // insert may have committed while its answer was lost in the cut. Such
    // a message may be delivered too, but only once and in its place.
    let last_accepted = accepted.last().copied().unwrap_or(199);
    let until = Instant::now() + Duration::from_secs(30);
    let bodies = loop {
        let lines = inbox(&c.workdir, &agent);
        let bodies: Vec<u64> = lines.iter().map(|l| l["body"].as_u64().unwrap()).collect();
        if bodies.contains(&last_accepted) {
            break bodies;
        }
        assert!(
            Instant::now() < until,
            "after the cut: {} lines, message {last_accepted} (accepted) missing",
            bodies.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        bodies.windows(2).all(|w| w[0] < w[1]),
        "delivered out of order or twice: {bodies:?}"
    );
    let delivered: std::collections::BTreeSet<u64> = bodies.iter().copied().collect();
    for i in (0..200).chain(accepted.iter().copied()) {
        assert!(
            delivered.contains(&i),
            "accepted message {i} was not delivered"
        );
    }
    for i in &delivered {
        assert!(
            *i < 200 || accepted.contains(i) || unknown.contains(i),
            "message {i} was delivered but never sent"
        );
    }
    let until = Instant::now() + Duration::from_secs(15);
    while metric(&a, "switchyard_command_bus_reconnects_total").await < 1.0 {
        assert!(
            Instant::now() < until,
            "A's listener reconnect was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a.wait_for("/readyz", 200, Duration::from_secs(15)).await,
        "A is ready again once its database is back"
    );
}

/// Invariant 1, state lives in storage: the originator (A) is killed with
/// SIGKILL the moment its 100th 202 is answered, while more calls are in
/// flight. Every message A answered 202 for reaches the agent through B,
/// which owns the broker's session, exactly once; a message whose answer
/// was lost may arrive too (it was committed), never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_originator_killed_right_after_its_202_loses_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut c = Cluster::new().await;
    let a = c.replica(c.db.url());
    let b = c.replica(c.db.url());
    let api_b = Api::new(&b.base, TOKEN);
    c.register_broker(&api_b).await;
    let _broker = c.broker(&[&b.base]);
    c.online_at(&api_b, &b).await;
    let agent = c.echo_agent(&api_b, "survivor").await;
    api_b.lifecycle("start", &agent).await;

    const KILL_AT: usize = 100;
    let pid = a.child.id().to_string();
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..6u64)
        .map(|k| {
            let (accepted, answered, pid) = (accepted.clone(), answered.clone(), pid.clone());
            let url = format!("{}/v1/agents/{agent}/messages", a.base);
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                for i in (k..600).step_by(6) {
                    let sent = http
                        .post(&url)
                        .bearer_auth(TOKEN)
                        .json(&json!({ "body": i }))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 202 => {
                            accepted.lock().unwrap().push(i);
                            if answered.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AT {
                                std::process::Command::new("kill")
                                    .args(["-KILL", &pid])
                                    .status()
                                    .unwrap();
                            }
                        }
                        // Refused or cut: A is gone.
                        _ => return,
                    }
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= KILL_AT,
        "A answered {} 202s",
        accepted.len()
    );
    assert!(accepted.len() < 600, "A was killed before the last call");

    let until = Instant::now() + Duration::from_secs(60);
    let lines = loop {
        let lines = inbox(&c.workdir, &agent);
        let got: std::collections::HashSet<u64> =
            lines.iter().filter_map(|l| l["body"].as_u64()).collect();
        if accepted.iter().all(|i| got.contains(i)) {
            break lines;
        }
        let missing = accepted.iter().filter(|i| !got.contains(i)).count();
        assert!(
            Instant::now() < until,
            "{missing} of {} accepted messages never arrived",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut bodies: Vec<u64> = lines.iter().filter_map(|l| l["body"].as_u64()).collect();
    let total = bodies.len();
    bodies.sort_unstable();
    bodies.dedup();
    assert_eq!(bodies.len(), total, "no message arrived twice");
    println!(
        "A answered {} calls with 202 before and while it was killed; {} messages arrived",
        accepted.len(),
        total
    );
    drop(a);
}
