//! The poll transport end to end: `switchyard serve` replicas and
//! `switchyard broker --transport poll|auto` as real processes, behind a
//! proxy that refuses WebSocket upgrades, with replicas and brokers killed
//! mid-stream.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use switchyard_testkit::{TcpProxy, TestDb};
use switchyard_tests::{Api, Setup, TOKEN, assert_once_in_order, inbox, wait_inbox};

switchyard_testkit::on_both_backends!(
    a_polling_broker_behind_a_proxy_that_refuses_upgrades_gets_1000_messages_once_and_in_order,
    a_broker_that_alternates_transports_every_50_messages_loses_and_duplicates_nothing,
    a_20_mib_file_sent_through_a_reaches_the_agent_of_a_broker_polling_b_unchanged,
);

fn addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

/// Sends bodies `range` through `api`, one after the other.
async fn send_range(api: &Api, agent: &str, range: std::ops::Range<u64>) {
    for n in range {
        api.send(agent, json!(n)).await;
    }
}

/// A broker that can only poll (its proxies refuse the upgrade, and it
/// falls back) gets 1,000 messages once and in order while the replica it
/// polls is killed (PostgreSQL), or while it is itself killed and started
/// again (SQLite: one replica).
async fn a_polling_broker_behind_a_proxy_that_refuses_upgrades_gets_1000_messages_once_and_in_order(
    db: TestDb,
) {
    const N: u64 = 1000;
    let mut setup = Setup::new(&db, db.url().starts_with("postgres")).await;
    let proxy_a = TcpProxy::refusing_upgrades(addr(&setup.a.base))
        .await
        .unwrap();
    let via_a = format!("http://{}", proxy_a.addr());
    let (proxy_b, via_b) = match &setup.b {
        Some(b) => {
            let proxy = TcpProxy::refusing_upgrades(addr(&b.base)).await.unwrap();
            let via = format!("http://{}", proxy.addr());
            (Some(proxy), Some(via))
        }
        None => (None, None),
    };
    // The broker polls B first (A when there is no B).
    let hubs: Vec<&str> = via_b
        .iter()
        .map(String::as_str)
        .chain([via_a.as_str()])
        .collect();
    let mut broker = setup.broker(&hubs, "auto");
    setup.online("poll").await;
    let agent = setup.api.echo_agent(&setup.broker_id, "worker").await;

    send_range(&setup.api, &agent, 0..N / 3).await;
    wait_inbox(&setup.workdir, &agent, 50, Duration::from_secs(30)).await;
    match setup.b.take() {
        Some(b) => b.kill9(),
        None => {
            broker.kill9();
            broker = setup.broker(&hubs, "auto");
        }
    }
    send_range(&setup.api, &agent, N / 3..N).await;
    let lines = wait_inbox(&setup.workdir, &agent, N as usize, Duration::from_secs(90)).await;
    assert_once_in_order(&lines, N as usize);
    let row = setup.online("poll").await;
    println!("after the kill: {row}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        inbox(&setup.workdir, &agent).len(),
        N as usize,
        "nothing after"
    );
    drop(broker);
    drop(proxy_b);
}

/// The same broker, restarted (SIGKILL) on the other transport after every
/// 50 messages while messages keep coming: every message arrives once, in
/// order.
async fn a_broker_that_alternates_transports_every_50_messages_loses_and_duplicates_nothing(
    db: TestDb,
) {
    const N: u64 = 300;
    let setup = Setup::new(&db, db.url().starts_with("postgres")).await;
    let hubs: Vec<&str> = setup
        .b
        .iter()
        .map(|b| b.base.as_str())
        .chain([setup.a.base.as_str()])
        .collect();
    let mut broker = setup.broker(&hubs, "ws");
    setup.online("ws").await;
    let agent = setup.api.echo_agent(&setup.broker_id, "worker").await;
    let sender = {
        let api = Api::new(&setup.a.base, TOKEN);
        let agent = agent.clone();
        tokio::spawn(async move {
            for n in 0..N {
                api.send(&agent, json!(n)).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let transports = ["ws", "poll"];
    for round in 1..(N / 50) as usize {
        wait_inbox(&setup.workdir, &agent, 50 * round, Duration::from_secs(30)).await;
        broker.kill9();
        let transport = transports[round % 2];
        broker = setup.broker(&hubs, transport);
        setup.online(transport).await;
    }
    sender.await.unwrap();
    let lines = wait_inbox(&setup.workdir, &agent, N as usize, Duration::from_secs(60)).await;
    assert_once_in_order(&lines, N as usize);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        inbox(&setup.workdir, &agent).len(),
        N as usize,
        "nothing after"
    );
    drop(broker);
}

/// A 20 MiB file sent through replica A reaches the agent of a broker that
/// polls replica B (SQLite: one replica) with the same SHA-256, and a file
/// named `../../etc/passwd` lands inside the agent's directory.
async fn a_20_mib_file_sent_through_a_reaches_the_agent_of_a_broker_polling_b_unchanged(
    db: TestDb,
) {
    use sha2::{Digest, Sha256};
    let setup = Setup::new(&db, db.url().starts_with("postgres")).await;
    let polled = setup.b.as_ref().unwrap_or(&setup.a).base.clone();
    let _broker = setup.broker(&[polled.as_str()], "poll");
    setup.online("poll").await;
    let agent = setup.api.echo_agent(&setup.broker_id, "worker").await;

    let big: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let big_sha = hex::encode(Sha256::digest(&big));
    let form = reqwest::multipart::Form::new()
        .text("message", json!({ "body": "files" }).to_string())
        .part(
            "file",
            reqwest::multipart::Part::bytes(big.clone()).file_name("big.bin"),
        )
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"not the real one".to_vec())
                .file_name("../../etc/passwd"),
        );
    let started = std::time::Instant::now();
    let response = setup
        .api
        .http
        .post(format!("{}/v1/agents/{agent}/messages", setup.a.base))
        .bearer_auth(TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let accepted = started.elapsed();
    let lines = wait_inbox(&setup.workdir, &agent, 1, Duration::from_secs(60)).await;
    println!(
        "20 MiB: accepted after {accepted:?}, in the agent's directory after {:?}",
        started.elapsed()
    );
    let dir = setup.workdir.join("agents").join(&agent);
    let got = std::fs::read(dir.join("files/big.bin")).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&got)), big_sha, "the same bytes");
    let passwd = std::fs::read(dir.join("files/passwd")).unwrap();
    assert_eq!(passwd, b"not the real one");
    assert!(
        !setup.workdir.join("etc").exists(),
        "nothing outside the agent's directory"
    );
    let files: Vec<&str> = lines[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["files/big.bin", "files/passwd"]);
    let message = lines[0]["id"].as_str().unwrap();
    setup
        .api
        .wait_until(
            &format!("/v1/messages/{message}"),
            Duration::from_secs(10),
            |m| m["state"] == "delivered",
        )
        .await;
}
