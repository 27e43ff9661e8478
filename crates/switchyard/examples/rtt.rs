//! Round-trip figures against a running hub and broker.
//!
//! ```sh
//! cargo run --release -p switchyard --example rtt -- \
//!     --hub http://127.0.0.1:7700 --token "$SWITCHYARD_TOKEN" --agent echo [--n 100]
//! ```
//!
//! The agent must exist and be running (its command should read stdin, e.g.
//! `sh -c 'while read l; do echo "$l" >> got.txt; done'`). Prints:
//!
//! - `start_rtt`: `POST /v1/agents/{agent}/restart` until the hub answers 200
//!   (the hub answers once the broker has reported the outcome);
//! - `message_rtt`: `POST /v1/agents/{agent}/messages` until
//!   `GET /v1/messages/{id}` says `delivered`, polling every 1 ms (so the
//!   figure includes up to ~1 ms of polling slack).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Args {
    hub: String,
    token: String,
    agent: String,
    n: usize,
}

fn usage() -> ! {
    eprintln!("usage: rtt --hub URL --token TOKEN --agent NAME [--n COUNT]");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut hub = None;
    let mut token = None;
    let mut agent = None;
    let mut n = 100;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--hub" => hub = Some(value.trim_end_matches('/').to_owned()),
            "--token" => token = Some(value),
            "--agent" => agent = Some(value),
            "--n" => n = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    match (hub, token, agent) {
        (Some(hub), Some(token), Some(agent)) if n > 0 => Args {
            hub,
            token,
            agent,
            n,
        },
        _ => usage(),
    }
}

/// Nearest-rank percentile of sorted samples, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted[idx].as_secs_f64() * 1000.0
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name} n={} p50={:.2}ms p90={:.2}ms min={:.2}ms max={:.2}ms",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 90.0),
        samples[0].as_secs_f64() * 1000.0,
        samples[samples.len() - 1].as_secs_f64() * 1000.0,
    );
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let client = reqwest::Client::new();
    let auth = format!("Bearer {}", args.token);
    let agent_url = format!("{}/v1/agents/{}", args.hub, args.agent);

    // The agent must be running, so that restart is valid and messages are
    // delivered to a live process.
    let resp = client
        .get(&agent_url)
        .header("Authorization", &auth)
        .send()
        .await
        .expect("hub unreachable");
    let status = resp.status();
    let agent: Value = resp.json().await.expect("agent: not JSON");
    assert!(status.is_success(), "GET {agent_url}: {status} {agent}");
    assert_eq!(
        agent["phase"], "running",
        "agent {} must be running: {agent}",
        args.agent
    );

    // (a) lifecycle round trip: restart, answered after the broker reports.
    let mut starts = Vec::with_capacity(args.n);
    for _ in 0..args.n {
        let t0 = Instant::now();
        let resp = client
            .post(format!("{agent_url}/restart"))
            .header("Authorization", &auth)
            .send()
            .await
            .expect("restart: hub unreachable");
        let status = resp.status();
        let body: Value = resp.json().await.expect("restart: not JSON");
        let elapsed = t0.elapsed();
        assert_eq!(status, 200, "restart: {status} {body}");
        let phase = body["agent"]["phase"].as_str().or(body["phase"].as_str());
        assert_eq!(phase, Some("running"), "restart: unexpected answer {body}");
        starts.push(elapsed);
    }
    report("start_rtt", starts);

    // (b) message round trip: send, then poll until delivered.
    let mut messages = Vec::with_capacity(args.n);
    for i in 0..args.n {
        let t0 = Instant::now();
        let resp = client
            .post(format!("{agent_url}/messages"))
            .header("Authorization", &auth)
            .json(&json!({ "body": format!("rtt {i}") }))
            .send()
            .await
            .expect("send: hub unreachable");
        let status = resp.status();
        let body: Value = resp.json().await.expect("send: not JSON");
        assert_eq!(status, 202, "send: {status} {body}");
        let id = body["id"].as_str().expect("send: no id").to_owned();
        let message_url = format!("{}/v1/messages/{id}", args.hub);
        loop {
            let resp = client
                .get(&message_url)
                .header("Authorization", &auth)
                .send()
                .await
                .expect("poll: hub unreachable");
            let body: Value = resp.json().await.expect("poll: not JSON");
            match body["state"].as_str() {
                Some("delivered") => break,
                Some("pending" | "dispatched") => {}
                _ => panic!("message {id}: unexpected answer {body}"),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "message {id} not delivered within 30 s: {body}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        messages.push(t0.elapsed());
    }
    report("message_rtt", messages);
}
