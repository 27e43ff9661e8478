//! Several replicas in one process on one PostgreSQL database, with a
//! broker driven frame by frame: affinity under flapping, and work written
//! while the broker's affinity moves.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{TestHub, fast_config};
use serde_json::json;
use switchyard_proto::{BrokerFrame, HubFrame};
use switchyard_testkit::{RawBroker, TestDb};

/// A second replica on the same database as `first`.
async fn second_replica(first: &TestHub) -> TestHub {
    second_replica_with(first, fast_config()).await
}

async fn second_replica_with(first: &TestHub, config: switchyard_hub::HubConfig) -> TestHub {
    let database = switchyard_store::open_database(first.db.url())
        .await
        .unwrap();
    let hub = switchyard_hub::Hub::start(config, database).await.unwrap();
    TestHub {
        db: TestDb::sqlite(), // unused; the database belongs to `first`
        store: first.store.clone(),
        base: format!("http://{}", hub.addr()),
        hub: Some(hub),
        http: reqwest::Client::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flapping_100_times_while_work_is_written_loses_nothing() {
    let a = TestHub::start(TestDb::postgres().await).await;
    let b = second_replica(&a).await;
    let (id, secret) = a.broker("flappy").await;
    let agent = a.agent(&id, "worker").await;
    let replicas = [&a, &b];

    // Each round: the broker connects to one replica (superseding its
    // session on the other) and a message is written through the other
    // replica at the same moment, so affinity moves while work is written.
    let mut sent = Vec::new();
    let mut last = None;
    for round in 0..100usize {
        let here = replicas[round % 2];
        let there = replicas[(round + 1) % 2];
        let path = format!("/v1/agents/{agent}/messages");
        let body = Some(json!({ "body": round }));
        let (connected, (status, message)) = tokio::join!(
            RawBroker::connect(&here.base, &id, &secret),
            there.call("POST", &path, body)
        );
        assert_eq!(status, 202, "{message}");
        sent.push(message["id"].as_str().unwrap().to_owned());
        last = Some((round % 2, connected));
    }
    let (side, mut broker) = last.unwrap();

    // Affinity names the last session on the last replica.
    let (_, row) = a.call("GET", &format!("/v1/brokers/{id}"), None).await;
    assert_eq!(row["status"], "online");
    assert_eq!(row["session_id"], json!(broker.session_id));
    let (_, health) = replicas[side].call("GET", "/healthz", None).await;
    assert_eq!(row["connected_replica"], health["instance_id"]);

    // Every message written during the flapping reaches the last session.
    let mut received = HashSet::new();
    let mut order = Vec::new();
    while received.len() < sent.len() {
        match tokio::time::timeout(Duration::from_secs(15), broker.recv()).await {
            Ok(Some(HubFrame::Message(m))) => {
                if received.insert(m.id.to_string()) {
                    order.push(m.body.as_u64().unwrap());
                }
                broker.ack(m.id).await;
            }
            Ok(Some(HubFrame::Dispatch(d))) => {
                broker.done(d.id).await;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => panic!("only {} of {} messages arrived", received.len(), sent.len()),
        }
    }
    assert_eq!(received, sent.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(
        order,
        (0..100).collect::<Vec<u64>>(),
        "per-agent order kept"
    );
    for id in &sent {
        b.wait_until(&format!("/v1/messages/{id}"), |m| m["state"] == "delivered")
            .await;
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_during_a_drain_delivers_the_backlog_once_each() {
    let a = TestHub::start(TestDb::postgres().await).await;
    let b = second_replica(&a).await;
    let (id, secret) = a.broker("busy").await;
    let agent = a.agent(&id, "worker").await;
    let mut sent = HashSet::new();
    for i in 0..300 {
        let (status, m) = a
            .call(
                "POST",
                &format!("/v1/agents/{agent}/messages"),
                Some(json!({ "body": i })),
            )
            .await;
        assert_eq!(status, 202);
        sent.insert(m["id"].as_str().unwrap().to_owned());
    }
    // A starts draining the backlog to a first session; B takes over
    // while A is mid-drain. Messages acked on the first socket stay
    // delivered; the rest go out again on B, each exactly once from B.
    let mut first = RawBroker::connect(&a.base, &id, &secret).await;
    let mut acked_first = HashSet::new();
    while acked_first.len() < 50 {
        match first.recv().await {
            Some(HubFrame::Message(m)) => {
                first.ack(m.id).await;
                acked_first.insert(m.id.to_string());
            }
            // The agent's create, which its messages wait for.
            Some(HubFrame::Dispatch(d)) => {
                first.done(d.id).await;
            }
            _ => {}
        }
    }
    // Once those acks are recorded, they are final: B must not resend them.
    // (An ack still on the wire when B takes over would be resent, which is
    // at-least-once delivery; the broker drops such duplicates.)
    for m in &acked_first {
        a.wait_until(&format!("/v1/messages/{m}"), |row| {
            row["state"] == "delivered"
        })
        .await;
    }
    let mut second = RawBroker::connect(&b.base, &id, &secret).await;
    let mut from_b = Vec::new();
    let mut done: HashSet<String> = acked_first.clone();
    while done.len() < sent.len() {
        match tokio::time::timeout(Duration::from_secs(15), second.recv()).await {
            Ok(Some(HubFrame::Message(m))) => {
                from_b.push(m.id.to_string());
                done.insert(m.id.to_string());
                second.ack(m.id).await;
            }
            Ok(Some(HubFrame::Dispatch(_))) => {}
            other => panic!("{} of {} done; then {other:?}", done.len(), sent.len()),
        }
    }
    let unique: HashSet<&String> = from_b.iter().collect();
    assert_eq!(unique.len(), from_b.len(), "B sent nothing twice");
    assert!(
        from_b.iter().all(|m| !acked_first.contains(m)),
        "nothing acked is resent"
    );
    assert_eq!(done, sent);
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_reach_watchers_and_waiters_on_another_replica() {
    let a = TestHub::start(TestDb::postgres().await).await;
    let b = second_replica(&a).await;
    let (id, secret) = a.broker("edge").await;
    let agent = a.agent(&id, "watched").await;
    let mut broker = RawBroker::connect(&b.base, &id, &secret).await;

    // A client watches the agent on A while the broker reports on B.
    let mut watch = a
        .http
        .get(a.url(&format!("/v1/events?agent={agent}")))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let agent_id: uuid::Uuid = agent.parse().unwrap();
    let driver = tokio::spawn(async move {
        while let Some(frame) = broker.recv().await {
            if let HubFrame::Dispatch(d) = frame {
                broker
                    .send(&BrokerFrame::Status(switchyard_proto::AgentStatus {
                        agent_id,
                        phase: switchyard_proto::Phase::Running,
                        seq: 1,
                        exit_code: None,
                        detail: None,
                    }))
                    .await;
                broker.done(d.id).await;
            }
        }
    });
    // A synchronous start on A is answered with the outcome produced on B,
    // through the event (long before the 10 s window would force a re-read).
    let asked = std::time::Instant::now();
    let (status, body) = a
        .call("POST", &format!("/v1/agents/{agent}/start"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phase"], "running");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    // A's lifecycle calls wake B through the command bus, not B's backstop.
    let (status, queued) = a
        .call(
            "POST",
            &format!("/v1/agents/{agent}/restart?wait=false"),
            None,
        )
        .await;
    assert_eq!(
        (status, queued["route"].as_str()),
        (202, Some("forward")),
        "{queued}"
    );

    let mut seen = String::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(seen.contains("event: agent_status") && seen.contains("event: dispatch_finished")) {
        let chunk = tokio::time::timeout_at(until, watch.chunk())
            .await
            .expect("events within 10 s")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("\"phase\":\"running\""), "{seen}");
    driver.abort();
    drop(watch);
    b.shutdown().await;
    a.shutdown().await;
}

/// Invariant 5, NOTIFY is a hint: the owner's command-bus listener is
/// connected to another database, so it hears none of the wake-ups the
/// other replica sends, yet every message written there still reaches the
/// broker, through the drain backstop. Prints how long work was stranded:
/// about one backstop interval (the interval restarts after each drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_arrives_through_the_backstop_when_every_wake_up_is_lost() {
    let backstop = Duration::from_millis(500);
    let elsewhere = TestDb::postgres().await;
    let deaf = switchyard_hub::HubConfig {
        drain_backstop: backstop,
        listener_database_url: Some(elsewhere.url().to_owned()),
        ..fast_config()
    };
    let owner = TestHub::start_with(TestDb::postgres().await, deaf).await;
    let writer = second_replica(&owner).await;
    let (id, secret) = owner.broker("edge").await;
    let agent = owner.agent(&id, "worker").await;
    let mut broker = RawBroker::connect(&owner.base, &id, &secret).await;

    let path = format!("/v1/agents/{agent}/messages");
    let mut stranded = Vec::new();
    for i in 0..20 {
        let (status, sent) = writer.call("POST", &path, Some(json!({ "body": i }))).await;
        assert_eq!(status, 202, "{sent}");
        assert_eq!(sent["route"], "forward", "{sent}");
        let accepted = tokio::time::Instant::now();
        loop {
            match broker.recv().await {
                Some(HubFrame::Message(m)) if m.body == i => {
                    stranded.push(accepted.elapsed());
                    broker.ack(m.id).await;
                    break;
                }
                Some(HubFrame::Dispatch(d)) => {
                    broker.done(d.id).await;
                }
                other => panic!("message {i}: unexpected {other:?}"),
            }
        }
    }
    let max = stranded.iter().max().copied().unwrap();
    let mean = stranded.iter().sum::<Duration>() / stranded.len() as u32;
    eprintln!(
        "stranded with every wake-up lost: mean {mean:?}, max {max:?} (backstop {backstop:?})"
    );
    assert!(
        max < backstop + Duration::from_secs(1),
        "stranded {max:?}, longer than the backstop allows"
    );
    // A working bus delivers in milliseconds: waiting this long shows the
    // wake-ups really were lost and the backstop did the work.
    assert!(
        mean > Duration::from_millis(50),
        "mean {mean:?}: was the bus deaf?"
    );
}

/// The `switchyard_notifications_sent_total` counter of a replica.
async fn notifications_sent(hub: &TestHub) -> u64 {
    let text = hub
        .http
        .get(hub.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("switchyard_notifications_sent_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

/// Invariant 7, the local path stays fast: when the broker's socket is on
/// the replica that took the call, nothing waits for NOTIFY. The replica's
/// listener is deaf (connected to another database) and its backstop an
/// hour long, so anything that needed a notification would never arrive;
/// messages arrive at once, a lifecycle call is answered, and the messages
/// sent no NOTIFY at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_calls_send_no_notify_and_wait_for_none() {
    let elsewhere = TestDb::postgres().await;
    let deaf = switchyard_hub::HubConfig {
        drain_backstop: Duration::from_secs(3600),
        listener_database_url: Some(elsewhere.url().to_owned()),
        ..fast_config()
    };
    let hub = TestHub::start_with(TestDb::postgres().await, deaf).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    let (seen, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(frame) = broker.recv().await {
            match frame {
                HubFrame::Message(m) => {
                    let _ = seen.send(m.body.clone());
                    broker.ack(m.id).await;
                }
                HubFrame::Dispatch(d) => {
                    broker.done(d.id).await;
                }
                _ => {}
            }
        }
    });

    // The agent's create goes out on connect; its outcome is an event that
    // other replicas hear by NOTIFY. Let that one pass first.
    hub.wait_until(&format!("/v1/dispatches?broker_id={id}"), |list| {
        list.as_array()
            .is_some_and(|l| !l.is_empty() && l.iter().all(|d| d["state"] == "done"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = notifications_sent(&hub).await;
    let path = format!("/v1/agents/{agent}/messages");
    for i in 0..20 {
        let (status, sent) = hub.call("POST", &path, Some(json!({ "body": i }))).await;
        assert_eq!((status, &sent["route"]), (202, &json!("local")), "{sent}");
        let got = tokio::time::timeout(Duration::from_secs(2), arrivals.recv()).await;
        assert_eq!(
            got.ok().flatten(),
            Some(json!(i)),
            "message {i} did not arrive at once"
        );
    }
    assert_eq!(
        notifications_sent(&hub).await,
        before,
        "local messages sent a NOTIFY"
    );
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/start?timeout_secs=5"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    driver.abort();
}

/// Reads the event stream until `what` appears or `within` passes; returns
/// what was read.
async fn read_events(watch: &mut reqwest::Response, what: &str, within: Duration) -> String {
    let mut seen = String::new();
    let until = tokio::time::Instant::now() + within;
    while !seen.contains(what) {
        match tokio::time::timeout_at(until, watch.chunk()).await {
            Ok(chunk) => {
                let chunk = chunk.unwrap().expect("the stream stays open");
                seen.push_str(&String::from_utf8_lossy(&chunk));
            }
            Err(_) => break,
        }
    }
    seen
}

/// Invariant 6, no ghost events: an event is published only after the
/// transaction that makes it true has committed. The test holds a row lock
/// on the dispatch (then on the agent), so the hub's update of it cannot
/// commit: while it waits, no event about it may appear; once the lock is
/// released, the event comes and the row already says what it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_event_is_published_before_its_commit() {
    use sqlx::Connection;
    let hub = TestHub::start(TestDb::postgres().await).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "watched").await;
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    // The agent's create, answered, so only the start is left.
    match broker.recv().await {
        Some(HubFrame::Dispatch(d)) => {
            broker.done(d.id).await;
        }
        other => panic!("expected the create dispatch, got {other:?}"),
    }
    let mut watch = hub
        .http
        .get(hub.url(&format!("/v1/events?agent={agent}")))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let (_, started) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/start?wait=false"),
            None,
        )
        .await;
    let dispatch = started["dispatch_id"].as_str().unwrap().to_owned();
    let Some(HubFrame::Dispatch(d)) = broker.recv().await else {
        panic!("expected the start dispatch");
    };
    let mut db = sqlx::PgConnection::connect(hub.db.url()).await.unwrap();

    // The dispatch's outcome, while its row is locked.
    let mut lock = db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM dispatch_intents WHERE id = $1::uuid FOR UPDATE")
        .bind(&dispatch)
        .execute(&mut *lock)
        .await
        .unwrap();
    broker.done(d.id).await;
    let early = read_events(&mut watch, &dispatch, Duration::from_secs(1)).await;
    assert!(
        !early.contains(&dispatch),
        "an event about the dispatch came before its commit: {early}"
    );
    lock.commit().await.unwrap();
    let seen = read_events(&mut watch, &dispatch, Duration::from_secs(5)).await;
    assert!(seen.contains("event: dispatch_finished"), "{seen}");
    let state: String =
        sqlx::query_scalar("SELECT state FROM dispatch_intents WHERE id = $1::uuid")
            .bind(&dispatch)
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(state, "done");

    // An agent status, while the agent's row is locked.
    let mut lock = db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM agents WHERE id = $1::uuid FOR UPDATE")
        .bind(&agent)
        .execute(&mut *lock)
        .await
        .unwrap();
    broker
        .send(&BrokerFrame::Status(switchyard_proto::AgentStatus {
            agent_id: agent.parse().unwrap(),
            phase: switchyard_proto::Phase::Running,
            seq: 7,
            exit_code: None,
            detail: None,
        }))
        .await;
    let early = read_events(&mut watch, "\"phase\":\"running\"", Duration::from_secs(1)).await;
    assert!(
        !early.contains("\"phase\":\"running\""),
        "an agent_status event came before its commit: {early}"
    );
    lock.commit().await.unwrap();
    let seen = read_events(&mut watch, "\"phase\":\"running\"", Duration::from_secs(5)).await;
    assert!(seen.contains("event: agent_status"), "{seen}");
}

/// The bus wakes a waiting poll: a message written on B reaches the poll
/// waiting on A long before the drain backstop (30 s here) would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_written_on_b_wakes_a_poll_waiting_on_a() {
    let slow = switchyard_hub::HubConfig {
        drain_backstop: Duration::from_secs(30),
        ..fast_config()
    };
    let a = TestHub::start_with(TestDb::postgres().await, slow.clone()).await;
    let b = second_replica_with(&a, slow).await;
    let (id, secret) = a.broker("polling").await;
    let agent = a.agent(&id, "worker").await;
    let poller = switchyard_testkit::poll::PollBroker::hello(&b.base, &id, &secret).await;
    // The create dispatch first (polled through B), then wait on A.
    let create = poller.poll(vec![], 5000).await.unwrap();
    let HubFrame::Dispatch(create) = &create[0] else {
        panic!("expected the create dispatch, got {create:?}");
    };
    let done = switchyard_testkit::poll::done(create.id);
    assert!(poller.report(vec![done]).await.unwrap().is_empty());
    let on_a = switchyard_testkit::poll::PollBroker {
        base: a.base.clone(),
        ..poller.clone()
    };
    let waiting = tokio::spawn(async move {
        let frames = on_a.poll(vec![], 20_000).await.unwrap();
        (frames, tokio::time::Instant::now())
    });
    // The poll moved the session to A.
    let (_, health) = a.call("GET", "/healthz", None).await;
    a.wait_until(&format!("/v1/brokers/{id}"), |row| {
        row["connected_replica"] == health["instance_id"]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let written = tokio::time::Instant::now();
    let (status, sent) = b
        .call(
            "POST",
            &format!("/v1/agents/{agent}/messages"),
            Some(json!({ "body": "wake up" })),
        )
        .await;
    assert_eq!(status, 202, "{sent}");
    let (frames, answered) = waiting.await.unwrap();
    let took = answered - written;
    println!(
        "a poll waiting on A answered {took:?} after the message was written on B (backstop 30 s)"
    );
    assert!(
        matches!(&frames[..], [HubFrame::Message(m)] if m.body == json!("wake up")),
        "{frames:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    b.shutdown().await;
    a.shutdown().await;
}
