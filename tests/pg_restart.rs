//! A PostgreSQL restart in the middle of traffic: a throwaway cluster this
//! test starts itself (initdb, pg_ctl; as the `postgres` user when run as
//! root), a real `switchyard serve` and a real broker on it. Nothing the
//! hub accepted is lost, nothing arrives twice.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_tests::pg_cluster::Cluster;
use switchyard_tests::{Api, BrokerProcess, Server, TOKEN, inbox};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_in_the_middle_of_traffic_loses_nothing() {
    let pg = Cluster::start();
    pg.create_database("sy");
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("broker");
    std::fs::create_dir_all(&workdir).unwrap();
    let server = Server::start(dir.path(), Some(&pg.url("sy")));
    let api = Api::new(&server.base, TOKEN);
    let (status, broker) = api
        .call("POST", "/v1/brokers", Some(json!({"name": "edge"})))
        .await;
    assert_eq!(status, 201, "{broker}");
    let broker_id = broker["id"].as_str().unwrap().to_owned();
    let _broker = BrokerProcess::start(
        &[&server.base],
        &broker_id,
        broker["secret"].as_str().unwrap(),
        &workdir,
    );
    api.wait_until(
        &format!("/v1/brokers/{broker_id}"),
        Duration::from_secs(20),
        |b| b["status"] == "online",
    )
    .await;
    let agent = api.echo_agent(&broker_id, "survivor").await;
    api.lifecycle("start", &agent).await;

    // Messages every 10 ms; the restart begins after the 100th.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/agents/{agent}/messages", server.base);
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut restart = None;
    let mut slowest = Duration::ZERO;
    for i in 0..400u64 {
        if i == 100 {
            let ctl = pg.ctl();
            restart = Some(std::thread::spawn(move || {
                ctl.pg_ctl(&["-m", "fast", "restart"]);
            }));
        }
        let asked = Instant::now();
        let sent = http
            .post(&url)
            .bearer_auth(TOKEN)
            .json(&json!({ "body": i }))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        slowest = slowest.max(asked.elapsed());
        match sent {
            Ok(r) if r.status() == 202 => accepted.push(i),
            Ok(r) => {
                assert_eq!(
                    r.status(),
                    503,
                    "only unavailable while the database restarts"
                );
                refused += 1;
            }
            Err(err) => panic!("the hub stopped answering: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    restart.unwrap().join().unwrap();
    assert!(accepted.len() > 100, "{} accepted", accepted.len());
    // The server really went down and came back while calls were made.
    let log = std::fs::read_to_string(pg.data().join("server.log")).unwrap_or_default();
    assert!(log.contains("database system is shut down"), "{log}");
    assert_eq!(
        log.matches("database system is ready to accept connections")
            .count(),
        2,
        "{log}"
    );

    let until = Instant::now() + Duration::from_secs(60);
    let lines = loop {
        let lines = inbox(&workdir, &agent);
        let got: HashSet<u64> = lines.iter().filter_map(|l| l["body"].as_u64()).collect();
        let missing = accepted.iter().filter(|i| !got.contains(i)).count();
        if missing == 0 {
            break lines;
        }
        assert!(
            Instant::now() < until,
            "{missing} of {} accepted messages never arrived",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ids: HashSet<&str> = lines.iter().filter_map(|l| l["id"].as_str()).collect();
    assert_eq!(ids.len(), lines.len(), "no message arrived twice");
    println!(
        "PostgreSQL restarted mid-traffic: {} of 400 accepted, {refused} refused with 503, \
         {} arrived; slowest call {slowest:?}",
        accepted.len(),
        lines.len()
    );
    drop(server);
}
