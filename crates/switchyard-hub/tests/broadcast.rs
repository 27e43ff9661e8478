//! Broadcasts (`POST /v1/messages` with `to`): one message to every agent
//! of a broker or every agent carrying labels, against a broker driven over
//! a real WebSocket.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestHub;
use serde_json::{Value, json};
use switchyard_proto::HubFrame;
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::RawBroker;
use uuid::Uuid;

switchyard_testkit::on_both_backends!(
    a_broadcast_to_a_label_reaches_exactly_the_labelled_agents_once_and_in_order,
    broadcasts_are_checked_and_idempotent_as_a_whole,
);

type Received = Arc<Mutex<HashMap<Uuid, Vec<Value>>>>;

/// Connects a broker that answers every dispatch and acks every message,
/// recording each agent's message bodies in arrival order.
async fn recording_broker(hub: &TestHub, id: &str, secret: &str) -> Received {
    let received: Received = Arc::default();
    let mut broker = RawBroker::connect(&hub.base, id, secret).await;
    let log = received.clone();
    tokio::spawn(async move {
        while let Some(frame) = broker.recv().await {
            match frame {
                HubFrame::Dispatch(d) => broker.done(d.id).await,
                HubFrame::Message(m) => {
                    log.lock()
                        .unwrap()
                        .entry(m.agent_id)
                        .or_default()
                        .push(m.body);
                    broker.ack(m.id).await;
                }
                _ => {}
            }
        }
    });
    received
}

async fn labelled_agent(hub: &TestHub, broker: &str, name: &str, team: &str) -> Uuid {
    let (status, body) = hub
        .call(
            "POST",
            "/v1/agents",
            Some(
                json!({ "name": name, "broker_id": broker, "command": ["true"],
                         "labels": { "team": team, "tier": "web" } }),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["labels"]["team"], team);
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn broadcast(hub: &TestHub, to: Value, body: Value) -> (u16, Value) {
    hub.call(
        "POST",
        "/v1/messages",
        Some(json!({ "to": to, "body": body })),
    )
    .await
}

/// While agents labelled team=a and team=b are being created, 30
/// broadcasts go to team=a. Each reaches exactly the team=a agents that
/// existed when it committed: every team=a agent gets an unbroken run of
/// broadcasts from its first to the last, once each and in order, and no
/// team=b agent gets any.
async fn a_broadcast_to_a_label_reaches_exactly_the_labelled_agents_once_and_in_order(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let received = recording_broker(&hub, &broker, &secret).await;
    let mut team_a = Vec::new();
    for i in 0..3 {
        team_a.push(labelled_agent(&hub, &broker, &format!("early-{i}"), "a").await);
    }
    const N: u64 = 30;
    let (created, sent) = tokio::join!(
        async {
            let mut a = Vec::new();
            let mut b = Vec::new();
            for i in 0..30 {
                let team = if i % 3 == 2 { "b" } else { "a" };
                let id = labelled_agent(&hub, &broker, &format!("late-{i}"), team).await;
                if team == "a" { a.push(id) } else { b.push(id) }
            }
            (a, b)
        },
        async {
            let mut answers = Vec::new();
            for k in 0..N {
                let (status, body) =
                    broadcast(&hub, json!({ "labels": { "team": "a" } }), json!(k)).await;
                assert_eq!(status, 202, "{body}");
                answers.push(body);
            }
            answers
        },
    );
    let (late_a, late_b) = created;
    team_a.extend(late_a);
    let total: usize = sent
        .iter()
        .map(|a| a["messages"].as_array().unwrap().len())
        .sum();
    // Wait until every copy has been delivered.
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got: usize = received.lock().unwrap().values().map(Vec::len).sum();
        if got >= total {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{got} of {total} copies arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let received = received.lock().unwrap().clone();
    for agent in &late_b {
        assert!(
            !received.contains_key(agent),
            "a team=b agent got a broadcast"
        );
    }
    for (k, answer) in sent.iter().enumerate() {
        for m in answer["messages"].as_array().unwrap() {
            let agent: Uuid = m["agent_id"].as_str().unwrap().parse().unwrap();
            assert!(team_a.contains(&agent), "broadcast {k} went to {agent}");
        }
    }
    let mut joined_late = 0;
    for agent in &team_a {
        let got: Vec<u64> = received
            .get(agent)
            .map(|v| v.iter().map(|b| b.as_u64().unwrap()).collect())
            .unwrap_or_default();
        let first = got.first().copied().unwrap_or(N);
        let expected: Vec<u64> = (first..N).collect();
        assert_eq!(
            got, expected,
            "agent {agent}: an unbroken run, once each, in order"
        );
        if first > 0 {
            joined_late += 1;
        }
    }
    assert_eq!(total, received.values().map(Vec::len).sum::<usize>());
    println!(
        "{} team=a agents, {joined_late} created during the broadcasts; {total} copies",
        team_a.len()
    );
    hub.shutdown().await;
}

async fn broadcasts_are_checked_and_idempotent_as_a_whole(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let (other, _) = hub.broker("other").await;
    let _received = recording_broker(&hub, &broker, &secret).await;
    for i in 0..3 {
        labelled_agent(&hub, &broker, &format!("w{i}"), "a").await;
    }
    labelled_agent(&hub, &other, "elsewhere", "a").await;

    // To a broker: its live agents only.
    let (status, body) = broadcast(&hub, json!({ "broker": "edge" }), json!("hi")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["messages"].as_array().unwrap().len(), 3);
    // Labels select across brokers; all pairs must match.
    let (_, body) = broadcast(&hub, json!({ "labels": { "team": "a" } }), json!(1)).await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 4);
    let (_, body) = broadcast(
        &hub,
        json!({ "labels": { "team": "a", "tier": "db" } }),
        json!(1),
    )
    .await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 0);

    // The key covers the whole broadcast: a retry after another agent was
    // created answers the first broadcast's messages, nothing more.
    let keyed = |body: Value| {
        hub.http
            .post(hub.url("/v1/messages"))
            .bearer_auth(common::TOKEN)
            .header("Idempotency-Key", "b-1")
            .json(&json!({ "to": { "labels": { "team": "a" } }, "body": body }))
            .send()
    };
    let first: Value = keyed(json!("x")).await.unwrap().json().await.unwrap();
    labelled_agent(&hub, &broker, "w3", "a").await;
    let again: Value = keyed(json!("x")).await.unwrap().json().await.unwrap();
    assert_eq!(first["broadcast_id"], again["broadcast_id"]);
    let ids = |v: &Value| {
        let mut ids: Vec<String> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&first), ids(&again));
    assert_eq!(ids(&again).len(), 4);
    assert_eq!(keyed(json!("y")).await.unwrap().status(), 422);

    let count = || async {
        let mut n = 0;
        let (_, agents) = hub.call("GET", "/v1/agents", None).await;
        for a in agents.as_array().unwrap() {
            n += a["id"].as_str().map_or(0, |_| 1);
        }
        n
    };
    let agents_before = count().await;
    for (body, expected) in [
        (
            json!({ "to": { "broker": "edge", "labels": { "team": "a" } }, "body": 1 }),
            422,
        ),
        (json!({ "to": {}, "body": 1 }), 422),
        (json!({ "to": { "labels": {} }, "body": 1 }), 422),
        (
            json!({ "to": { "labels": { "Team": "a" } }, "body": 1 }),
            422,
        ),
        (
            json!({ "to": { "labels": { "team": "a b" } }, "body": 1 }),
            422,
        ),
        (json!({ "to": { "broker": "edge" } }), 422),
        (
            json!({ "to": { "broker": "edge" }, "body": 1, "messages": [] }),
            422,
        ),
        (json!({ "to": { "broker": "nobody" }, "body": 1 }), 404),
    ] {
        let (status, answer) = hub.call("POST", "/v1/messages", Some(body.clone())).await;
        assert_eq!(status, expected, "{body}: {answer}");
    }
    let (status, _) = hub
        .call(
            "POST",
            "/v1/agents",
            Some(
                json!({ "name": "bad", "broker_id": "edge", "command": ["true"],
                         "labels": { "-x": "1" } }),
            ),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(count().await, agents_before);
    hub.shutdown().await;
}
