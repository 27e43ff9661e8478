//! `deploy/haproxy.cfg` run as it is: a real HAProxy in front of three
//! `switchyard serve` replicas on one PostgreSQL, a real broker and the
//! CLI reaching the hub only through it, and the replica holding the
//! broker's session killed mid-stream. `scripts/test.sh` installs HAProxy
//! when it is missing.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_testkit::TestDb;
use switchyard_tests::{Api, BrokerProcess, Server, TOKEN, inbox, switchyard};

/// HAProxy running the deploy configuration; killed when dropped.
struct Haproxy {
    child: Child,
    base: String,
}

impl Haproxy {
    fn start(replicas: &[&str]) -> Haproxy {
        let binary = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| which("haproxy"))
            .expect("haproxy is installed (scripts/test.sh installs it with apt-get)");
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg");
        let mut command = Command::new(binary);
        command
            .arg("-db")
            .arg("-f")
            .arg(config)
            .env("SWITCHYARD_LB_BIND", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (i, replica) in replicas.iter().enumerate() {
            let addr = replica.trim_start_matches("http://");
            command.env(format!("SWITCHYARD_REPLICA_{}", i + 1), addr);
        }
        Haproxy {
            child: command.spawn().unwrap(),
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists())
}

async fn status(url: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_behind_haproxy_lose_nothing_accepted_when_one_is_killed() {
    const N: u64 = 300;
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("broker");
    std::fs::create_dir_all(&workdir).unwrap();
    let mut replicas: Vec<Option<Server>> = (0..3)
        .map(|_| Some(Server::start(dir.path(), Some(db.url()))))
        .collect();
    let bases: Vec<String> = replicas
        .iter()
        .map(|r| r.as_ref().unwrap().base.clone())
        .collect();
    let lb = Haproxy::start(&bases.iter().map(String::as_str).collect::<Vec<_>>());
    let until = Instant::now() + Duration::from_secs(15);
    while status(&format!("{}/readyz", lb.base)).await != Some(200) {
        assert!(Instant::now() < until, "HAProxy never served /readyz");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Everything below reaches the hub only through HAProxy.
    let api = Api::new(&lb.base, TOKEN);
    let (code, broker) = api
        .call("POST", "/v1/brokers", Some(json!({ "name": "edge" })))
        .await;
    assert_eq!(code, 201, "{broker}");
    let broker_id = broker["id"].as_str().unwrap().to_owned();
    let secret = broker["secret"].as_str().unwrap();
    let _broker = BrokerProcess::start(&[lb.base.as_str()], &broker_id, secret, &workdir);
    api.wait_until(
        &format!("/v1/brokers/{broker_id}"),
        Duration::from_secs(20),
        |row| row["status"] == "online",
    )
    .await;
    let agent = api.echo_agent(&broker_id, "worker").await;
    let cli = |args: &[&str]| {
        let out = switchyard(&workdir)
            .args(args)
            .env("SWITCHYARD_HUB", &lb.base)
            .env("SWITCHYARD_TOKEN", TOKEN)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = cli(&["agents", "start", "worker"]);
    assert_eq!(code, Some(0), "{out}");

    // Messages through HAProxy while the replica holding the broker's
    // session is killed. A call that got no 202 was not accepted; one
    // whose 202 was lost may still arrive, once.
    let sender = {
        let api = Api::new(&lb.base, TOKEN);
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            for n in 0..N {
                let request = api
                    .http
                    .post(format!("{}/v1/agents/{agent}/messages", api.base))
                    .bearer_auth(&api.token)
                    .timeout(Duration::from_secs(30))
                    .json(&json!({ "body": n }));
                if let Ok(response) = request.send().await
                    && response.status().as_u16() == 202
                {
                    accepted.push(n);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            accepted
        })
    };
    let until = Instant::now() + Duration::from_secs(30);
    while inbox(&workdir, &agent).len() < 50 {
        assert!(Instant::now() < until, "the first messages never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, row) = api
        .call("GET", &format!("/v1/brokers/{broker_id}"), None)
        .await;
    let mut owner = None;
    for (i, base) in bases.iter().enumerate() {
        let health: Value = reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if health["instance_id"] == row["connected_replica"] {
            owner = Some(i);
        }
    }
    let owner = owner.expect("one of the three holds the broker's session");
    replicas[owner].take().unwrap().kill9();
    let killed_at = Instant::now();

    let accepted = sender.await.unwrap();
    assert!(
        accepted.len() as u64 > N / 2,
        "most calls were accepted: {}",
        accepted.len()
    );
    let until = Instant::now() + Duration::from_secs(60);
    let lines = loop {
        let lines = inbox(&workdir, &agent);
        let got: HashSet<u64> = lines.iter().map(|l| l["body"].as_u64().unwrap()).collect();
        if accepted.iter().all(|n| got.contains(n)) {
            break lines;
        }
        assert!(
            Instant::now() < until,
            "{} of {} accepted messages arrived",
            accepted.iter().filter(|n| got.contains(n)).count(),
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "{} of {N} calls accepted; all arrived, the last {:?} after the kill",
        accepted.len(),
        killed_at.elapsed()
    );
    let bodies: Vec<u64> = lines.iter().map(|l| l["body"].as_u64().unwrap()).collect();
    let ids: HashSet<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), lines.len(), "each message once");
    assert!(
        bodies.windows(2).all(|w| w[0] < w[1]),
        "in order: {bodies:?}"
    );

    // The broker is back on one of the other two, and the CLI still works
    // through HAProxy.
    let row = api
        .wait_until(
            &format!("/v1/brokers/{broker_id}"),
            Duration::from_secs(30),
            |row| row["status"] == "online",
        )
        .await;
    println!("broker now on {}", row["connected_replica"]);
    let (code, out) = cli(&["agents", "ls"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("worker"), "{out}");
}
