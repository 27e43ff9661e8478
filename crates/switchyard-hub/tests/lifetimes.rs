//! Message lifetimes: `ttl_secs` and `deliver_after`, against a broker
//! driven over a real WebSocket.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::TestHub;
use serde_json::{Value, json};
use switchyard_proto::HubFrame;
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::RawBroker;

switchyard_testkit::on_both_backends!(
    an_expired_message_is_never_delivered,
    a_delayed_message_waits_and_holds_back_the_ones_after_it,
    lifetimes_out_of_range_are_refused_before_anything_is_written,
);

async fn send(hub: &TestHub, agent: &str, body: Value) -> (u16, Value) {
    hub.call("POST", &format!("/v1/agents/{agent}/messages"), Some(body))
        .await
}

/// Message bodies the broker receives within `within`, answering every
/// dispatch and acking every message; with the time each arrived.
async fn receive(broker: &mut RawBroker, within: Duration) -> Vec<(Value, Instant)> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + within;
    while let Ok(Some(frame)) = tokio::time::timeout_at(until, broker.recv()).await {
        match frame {
            HubFrame::Dispatch(d) => broker.done(d.id).await,
            HubFrame::Message(m) => {
                got.push((m.body, Instant::now()));
                broker.ack(m.id).await;
            }
            _ => {}
        }
    }
    got
}

async fn an_expired_message_is_never_delivered(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let (status, short) = send(&hub, &agent, json!({ "body": "short", "ttl_secs": 1 })).await;
    assert_eq!(status, 202, "{short}");
    let (status, _) = send(&hub, &agent, json!({ "body": "long" })).await;
    assert_eq!(status, 202);
    // The broker connects after the first message's TTL: it never gets it,
    // whether or not the sweeper has marked it yet.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    let got: Vec<Value> = receive(&mut broker, Duration::from_secs(2))
        .await
        .into_iter()
        .map(|(body, _)| body)
        .collect();
    assert_eq!(got, [json!("long")]);
    let short = short["id"].as_str().unwrap();
    hub.wait_until(&format!("/v1/messages/{short}"), |m| {
        m["state"] == "expired"
    })
    .await;
    hub.shutdown().await;
}

async fn a_delayed_message_waits_and_holds_back_the_ones_after_it(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    receive(&mut broker, Duration::from_millis(300)).await;
    let sent_at = Instant::now();
    let after = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let (status, body) = send(
        &hub,
        &agent,
        json!({ "body": "first", "deliver_after": after }),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "pending");
    let (status, _) = send(&hub, &agent, json!({ "body": "second" })).await;
    assert_eq!(status, 202);
    let got = receive(&mut broker, Duration::from_secs(4)).await;
    let bodies: Vec<&Value> = got.iter().map(|(b, _)| b).collect();
    assert_eq!(
        bodies,
        [&json!("first"), &json!("second")],
        "in acceptance order"
    );
    let waited = got[0].1 - sent_at;
    println!("the delayed message arrived after {waited:?} (asked: 1.5 s)");
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    hub.shutdown().await;
}

async fn lifetimes_out_of_range_are_refused_before_anything_is_written(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, _) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let now = chrono::Utc::now();
    for body in [
        json!({ "body": 1, "ttl_secs": 0 }),
        json!({ "body": 1, "ttl_secs": 2_592_001 }),
        json!({ "body": 1, "deliver_after": now + chrono::Duration::days(8) }),
        json!({ "body": 1, "ttl_secs": 10, "deliver_after": now + chrono::Duration::seconds(20) }),
    ] {
        let (status, answer) = send(&hub, &agent, body.clone()).await;
        assert_eq!(status, 422, "{body}: {answer}");
    }
    let (status, _) = hub
        .call(
            "POST",
            "/v1/messages",
            Some(json!({ "messages": [{ "agent": agent, "body": 1, "ttl_secs": 0 }] })),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = send(
        &hub,
        &agent,
        json!({ "body": 1, "deliver_after": "tomorrow" }),
    )
    .await;
    assert_eq!(status, 422);
    let (_, agent_row) = hub.call("GET", &format!("/v1/agents/{agent}"), None).await;
    assert!(agent_row["id"].is_string());
    // Nothing was written: the first message sent now gets seq 1.
    let (status, first) = send(&hub, &agent, json!({ "body": "ok" })).await;
    assert_eq!(status, 202);
    assert_eq!(first["seq"], 1, "{first}");
    hub.shutdown().await;
}
