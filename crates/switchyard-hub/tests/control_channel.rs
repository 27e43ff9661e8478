//! The broker control channel over real WebSockets, driven frame by frame.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::TestHub;
use futures::SinkExt;
use serde_json::json;
use switchyard_proto::auth::Handshake;
use switchyard_proto::{
    AgentStatus, BrokerFrame, DispatchResult, ErrorCode, ErrorFrame, HubFrame, Op, Phase,
};
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::{RawBroker, close_code, recv, send, upgrade};
use tokio_tungstenite::tungstenite::Message;

switchyard_testkit::on_both_backends!(
    handshake_rejects_wrong_secret_replay_stale_time_and_unknown_broker,
    a_newer_session_supersedes_the_older_socket,
    queued_work_is_drained_in_order_when_the_broker_connects,
    lifecycle_call_answers_with_the_brokers_outcome,
    reports_about_another_brokers_agents_are_refused,
    protocol_violations_get_an_error_frame_and_a_close,
    the_close_handshake_completes_so_the_broker_reads_the_code,
    a_message_that_ends_every_session_is_dead_lettered_and_the_queue_moves_on,
    what_an_agent_reports_is_kept_on_the_agent,
    messages_and_operations_reach_the_broker_in_the_order_they_were_written,
    handshake_timestamps_at_the_ends_of_the_range_are_refused_without_overflow,
    a_broker_that_stops_reading_is_disconnected_and_its_work_waits,
);

/// A broker that stops reading costs the hub a bounded queue, then its
/// session: once one write has waited longer than the write timeout the
/// hub disconnects it (the broker shows offline), its messages wait
/// undelivered for its next session, and shutdown is not held up by the
/// stalled socket. The heartbeat is slow here, so only the write timeout
/// can end the session within the test.
async fn a_broker_that_stops_reading_is_disconnected_and_its_work_waits(db: TestDb) {
    let config = switchyard_hub::HubConfig {
        write_timeout: Duration::from_secs(1),
        heartbeat_interval: Duration::from_secs(60),
        ..common::fast_config()
    };
    let hub = TestHub::start_with(db, config).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut stalled = RawBroker::connect(&hub.base, &id, &secret).await;
    // The agent's create is answered first: its messages wait for it (one
    // order per agent). Then the broker stops reading.
    match stalled.recv().await {
        Some(HubFrame::Dispatch(d)) => {
            stalled.done(d.id).await;
        }
        other => panic!("expected the create dispatch, got {other:?}"),
    }
    hub.wait_until(&format!("/v1/dispatches?broker_id={id}"), |list| {
        list[0]["state"] == "done"
    })
    .await;

    // About 25 MB: more than the socket buffers of both ends hold.
    let body = "x".repeat(250_000);
    let mut last = String::new();
    for _ in 0..100 {
        let (status, message) = hub
            .call(
                "POST",
                &format!("/v1/agents/{agent}/messages"),
                Some(json!({ "body": body })),
            )
            .await;
        assert_eq!(status, 202, "{message}");
        last = message["id"].as_str().unwrap().to_owned();
    }
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, broker) = hub.call("GET", &format!("/v1/brokers/{id}"), None).await;
        if broker["status"] == "offline" {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the stalled broker was never disconnected: {broker}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, message) = hub.call("GET", &format!("/v1/messages/{last}"), None).await;
    assert_ne!(message["state"], "delivered", "{message}");
    tokio::time::timeout(Duration::from_secs(10), hub.shutdown())
        .await
        .expect("shutdown is not held up by the stalled socket");
    drop(stalled);
}

/// The clock-skew check is checked arithmetic: timestamps at the ends of
/// the `i64` range get the 401 of any stale handshake, not a panic (which
/// would drop the connection with no answer), and the hub keeps serving.
async fn handshake_timestamps_at_the_ends_of_the_range_are_refused_without_overflow(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    for timestamp in [i64::MIN, i64::MIN + 1, i64::MAX] {
        let hostile = Handshake::signed_at(&id, &secret, timestamp);
        assert_eq!(
            upgrade(&hub.base, &hostile).await.err(),
            Some(401),
            "timestamp {timestamp}"
        );
    }
    upgrade(&hub.base, &Handshake::new(&id, &secret))
        .await
        .expect("a good handshake still upgrades");
    hub.shutdown().await;
}

async fn handshake_rejects_wrong_secret_replay_stale_time_and_unknown_broker(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;

    assert_eq!(
        upgrade(&hub.base, &Handshake::new(&id, "wrong"))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        upgrade(
            &hub.base,
            &Handshake::new(&uuid::Uuid::new_v4().to_string(), &secret)
        )
        .await
        .err(),
        Some(401)
    );
    let stale = Handshake::signed_at(&id, &secret, chrono::Utc::now().timestamp() - 3600);
    assert_eq!(upgrade(&hub.base, &stale).await.err(), Some(401));

    // The name works as well as the id; the same signed handshake twice is a replay.
    let good = Handshake::new("edge", &secret);
    let socket = upgrade(&hub.base, &good)
        .await
        .expect("a good handshake upgrades");
    drop(socket);
    assert_eq!(
        upgrade(&hub.base, &good).await.err(),
        Some(401),
        "replay refused"
    );

    let (status, broker) = hub.call("GET", &format!("/v1/brokers/{id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(broker["status"], "offline", "no hello, no session");
    hub.shutdown().await;
}

async fn a_newer_session_supersedes_the_older_socket(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let mut first = RawBroker::connect(&hub.base, &id, &secret).await;
    let second = RawBroker::connect(&hub.base, &id, &secret).await;

    match first.recv().await {
        Some(HubFrame::Error(ErrorFrame {
            code: ErrorCode::Superseded,
            ..
        })) => {}
        other => panic!("expected a superseded error, got {other:?}"),
    }
    assert_eq!(close_code(&mut first.socket).await, Some(4000));
    // The old socket's teardown must not mark the new session offline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, broker) = hub.call("GET", &format!("/v1/brokers/{id}"), None).await;
    assert_eq!(broker["status"], "online");
    assert_eq!(broker["session_id"], json!(second.session_id));
    drop(second);
    hub.shutdown().await;
}

async fn queued_work_is_drained_in_order_when_the_broker_connects(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let (status, started) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/start?wait=false"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let mut sent = Vec::new();
    for i in 0..3 {
        let (status, body) = hub
            .call(
                "POST",
                &format!("/v1/agents/{agent}/messages"),
                Some(json!({ "body": format!("m{i}") })),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["state"], "pending");
        sent.push(body["id"].as_str().unwrap().to_owned());
    }

    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    let mut ops = Vec::new();
    let mut bodies = Vec::new();
    while bodies.len() < 3 {
        match broker.recv().await.expect("frame") {
            HubFrame::Dispatch(d) => {
                assert_eq!(d.agent.name, "worker");
                assert_eq!(d.agent.command, vec!["sleep", "60"]);
                ops.push(d.op);
                broker
                    .send(&BrokerFrame::Result(DispatchResult {
                        dispatch_id: d.id,
                        ok: true,
                        result: Some(json!({ "phase": "running" })),
                        error: None,
                        code: None,
                    }))
                    .await;
            }
            HubFrame::Message(m) => {
                bodies.push(m.body.as_str().unwrap().to_owned());
                broker.ack(m.id).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        ops,
        vec![Op::Create, Op::Start],
        "lifecycle ops first, in order"
    );
    assert_eq!(bodies, vec!["m0", "m1", "m2"]);

    let dispatch = started["dispatch_id"].as_str().unwrap();
    hub.wait_until(&format!("/v1/dispatches/{dispatch}"), |d| {
        d["state"] == "done"
    })
    .await;
    for m in &sent {
        hub.wait_until(&format!("/v1/messages/{m}"), |row| {
            row["state"] == "delivered"
        })
        .await;
    }
    hub.shutdown().await;
}

async fn lifecycle_call_answers_with_the_brokers_outcome(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    let agent_uuid: uuid::Uuid = agent.parse().unwrap();

    // The broker answers: created ok; start -> status running, then ok;
    // stop -> failure.
    let driver = tokio::spawn(async move {
        let mut seq = 0;
        while let Some(frame) = broker.recv().await {
            let HubFrame::Dispatch(d) = frame else {
                continue;
            };
            seq += 1;
            let (ok, phase) = match d.op {
                Op::Create => (true, Phase::Created),
                Op::Start => (true, Phase::Running),
                _ => (false, Phase::Running),
            };
            if ok {
                broker
                    .send(&BrokerFrame::Status(AgentStatus {
                        agent_id: agent_uuid,
                        phase,
                        seq,
                        exit_code: None,
                        detail: None,
                    }))
                    .await;
            }
            broker
                .send(&BrokerFrame::Result(DispatchResult {
                    dispatch_id: d.id,
                    ok,
                    result: ok.then(|| json!({ "phase": phase })),
                    code: None,
                    error: (!ok).then(|| "cannot stop: simulated".to_owned()),
                }))
                .await;
        }
    });

    let (status, body) = hub
        .call("POST", &format!("/v1/agents/{agent}/start"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phase"], "running");
    assert_eq!(body["dispatch"]["state"], "done");

    let (status, body) = hub
        .call("POST", &format!("/v1/agents/{agent}/stop"), None)
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "broker_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("simulated")
    );
    let dispatch = body["error"]["dispatch_id"].as_str().unwrap().to_owned();
    let (_, d) = hub
        .call("GET", &format!("/v1/dispatches/{dispatch}"), None)
        .await;
    assert_eq!(d["state"], "failed");

    // Invalid in the current phase: nothing is written.
    let (status, body) = hub
        .call("POST", &format!("/v1/agents/{agent}/start"), None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("invalid_phase"))
    );
    driver.abort();
    hub.shutdown().await;
}

async fn reports_about_another_brokers_agents_are_refused(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (victim, _) = hub.broker("victim").await;
    let (intruder, secret) = hub.broker("intruder").await;
    let agent = hub.agent(&victim, "target").await;
    let (_, message) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/messages"),
            Some(json!({"body": 1})),
        )
        .await;
    let mut broker = RawBroker::connect(&hub.base, &intruder, &secret).await;
    broker
        .send(&BrokerFrame::Status(AgentStatus {
            agent_id: agent.parse().unwrap(),
            phase: Phase::Error,
            seq: i64::MAX,
            exit_code: Some(1),
            detail: None,
        }))
        .await;
    match broker.recv().await {
        Some(HubFrame::Error(ErrorFrame {
            code: ErrorCode::Forbidden,
            ..
        })) => {}
        other => panic!("expected forbidden, got {other:?}"),
    }
    broker
        .send(&BrokerFrame::Ack {
            message_ids: vec![message["id"].as_str().unwrap().parse().unwrap()],
            received: Vec::new(),
        })
        .await;
    match broker.recv().await {
        Some(HubFrame::Error(ErrorFrame {
            code: ErrorCode::Forbidden,
            ..
        })) => {}
        other => panic!("expected forbidden, got {other:?}"),
    }
    let (_, row) = hub.call("GET", &format!("/v1/agents/{agent}"), None).await;
    assert_eq!(row["phase"], "created");
    let (_, row) = hub
        .call(
            "GET",
            &format!("/v1/messages/{}", message["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(row["state"], "pending");
    hub.shutdown().await;
}

/// The hub finishes the close handshake: after its close frame it keeps
/// the connection (reading) until the broker's close frame, for a short
/// while at most, instead of dropping the socket at once. A drop with data
/// still unread makes the kernel reset the connection and discard what it
/// had not sent yet, often the close frame itself: the broker would see
/// 1006 instead of the code that says why.
async fn the_close_handshake_completes_so_the_broker_reads_the_code(db: TestDb) {
    use tokio::io::AsyncReadExt;
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
    b.socket
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut b.socket).await, Some(1003));
    // The broker has not answered with its own close frame yet: the hub
    // waits for it rather than ending the connection.
    let mut tcp = match b.socket.into_inner() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!("the test hub speaks plain TCP"),
    };
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the hub ended the connection before the broker's close: {early:?}"
    );
    hub.shutdown().await;
}

/// Poison work: a message the broker dies on (it disconnects without an
/// ack every time it gets it) used to be resent at every reconnect for as
/// long as it lived, holding back every later message of its agent. After
/// `max_attempts` sessions it fails with a reason, is counted, and the
/// agent's next message is delivered.
async fn a_message_that_ends_every_session_is_dead_lettered_and_the_queue_moves_on(db: TestDb) {
    let config = switchyard_hub::HubConfig {
        max_attempts: 3,
        ..common::fast_config()
    };
    let hub = TestHub::start_with(db, config).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let path = format!("/v1/agents/{agent}/messages");
    let (_, poison) = hub
        .call("POST", &path, Some(json!({"body": "poison"})))
        .await;
    let (_, next) = hub.call("POST", &path, Some(json!({"body": "next"}))).await;
    for attempt in 1..=3 {
        let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
        loop {
            match b.recv().await {
                // The agent's create: done, it is not what this test poisons.
                Some(HubFrame::Dispatch(d)) => {
                    b.done(d.id).await;
                }
                Some(HubFrame::Message(m)) => {
                    assert_eq!(m.body, "poison", "attempt {attempt}");
                    break;
                }
                other => panic!("attempt {attempt}: expected the poison message, got {other:?}"),
            }
        }
        drop(b);
        hub.wait_until("/v1/brokers/edge", |b| b["status"] == "offline")
            .await;
    }
    let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
    match b.recv().await {
        Some(HubFrame::Message(m)) => {
            assert_eq!(m.body, "next");
            assert_eq!(json!(m.id), next["id"]);
        }
        other => panic!("expected the next message, got {other:?}"),
    }
    let (_, row) = hub
        .call(
            "GET",
            &format!("/v1/messages/{}", poison["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(row["state"], "failed", "{row}");
    assert!(
        row["error"].as_str().unwrap().contains("session ended"),
        "{row}"
    );
    let metrics = hub
        .http
        .get(hub.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchyard_dead_letters_total{kind=\"message\"} 1"),
        "{metrics}"
    );
    hub.shutdown().await;
}

/// The exit code and detail of a status report used to be dropped: an
/// operator saw `error` and not why. They are kept from the last applied
/// report, bounded (a detail with a NUL byte or of any length is stored,
/// not refused), shown on the agent and carried by the event.
async fn what_an_agent_reports_is_kept_on_the_agent(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
    let report = |seq, exit_code, detail: Option<String>| {
        BrokerFrame::Status(AgentStatus {
            agent_id: agent.parse().unwrap(),
            phase: Phase::Error,
            seq,
            exit_code,
            detail,
        })
    };
    b.send(&report(1, Some(3), Some("exited with 3".into())))
        .await;
    let row = hub
        .wait_until(&format!("/v1/agents/{agent}"), |a| a["phase"] == "error")
        .await;
    assert_eq!(
        (row["exit_code"].as_i64(), row["detail"].as_str()),
        (Some(3), Some("exited with 3"))
    );

    let hostile = format!("nul\u{0}{}", "x".repeat(100_000));
    b.send(&report(2, Some(-9), Some(hostile))).await;
    let row = hub
        .wait_until(&format!("/v1/agents/{agent}"), |a| a["exit_code"] == -9)
        .await;
    let detail = row["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("nul\u{fffd}x") && detail.ends_with('…'),
        "{detail:.40}"
    );
    assert!(detail.len() <= 4096);
    assert_eq!(row["phase"], "error", "the session lived on: {row}");
    hub.shutdown().await;
}

/// With the broker offline, `send m1`, `restart`, `send m2` used to reach
/// it as restart, m1, m2. One order per agent across operations and
/// messages: create, m1, restart, m2, as written.
async fn messages_and_operations_reach_the_broker_in_the_order_they_were_written(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let path = format!("/v1/agents/{agent}/messages");
    hub.call("POST", &path, Some(json!({"body": "m1"}))).await;
    let (status, _) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/restart?wait=false"),
            None,
        )
        .await;
    assert_eq!(status, 202);
    hub.call("POST", &path, Some(json!({"body": "m2"}))).await;

    let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("m2") {
        match b.recv().await {
            Some(HubFrame::Dispatch(d)) => {
                seen.push(d.op.to_string());
                b.done(d.id).await;
            }
            Some(HubFrame::Message(m)) => {
                seen.push(m.body.as_str().unwrap().to_owned());
                b.ack(m.id).await;
            }
            other => panic!("unexpected {other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen, ["create", "m1", "restart", "m2"]);
    hub.shutdown().await;
}

async fn protocol_violations_get_an_error_frame_and_a_close(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;

    // Not JSON.
    let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
    b.socket
        .send(Message::Text("{not json".into()))
        .await
        .unwrap();
    match b.recv().await {
        Some(HubFrame::Error(ErrorFrame {
            code: ErrorCode::Protocol,
            ..
        })) => {}
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(close_code(&mut b.socket).await, Some(1002));

    // A newer protocol version.
    let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
    b.socket
        .send(Message::Text(
            r#"{"v":9,"type":"ack","message_ids":[]}"#.into(),
        ))
        .await
        .unwrap();
    match b.recv().await {
        Some(HubFrame::Error(e)) => assert!(e.message.contains("version 9"), "{e:?}"),
        other => panic!("expected a version error, got {other:?}"),
    }

    // Binary data.
    let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
    b.socket
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut b.socket).await, Some(1003));

    // Larger than the message limit.
    let mut b = RawBroker::connect(&hub.base, &id, &secret).await;
    let huge = format!(
        r#"{{"v":1,"type":"error","code":"protocol","message":"{}"}}"#,
        "x".repeat(switchyard_proto::MAX_MESSAGE_BYTES + 1)
    );
    let _ = b.socket.send(Message::Text(huge.into())).await;
    // The hub answers 1009; the close frame may be lost to a TCP reset when
    // the hub stops reading the rest of the oversized message.
    let code = close_code(&mut b.socket).await;
    assert!(matches!(code, Some(1009) | None), "closed: {code:?}");

    // The first frame must be hello.
    let mut socket = upgrade(&hub.base, &Handshake::new(&id, &secret))
        .await
        .unwrap();
    send(
        &mut socket,
        &BrokerFrame::Ack {
            message_ids: vec![],
            received: Vec::new(),
        },
    )
    .await;
    assert!(matches!(recv(&mut socket).await, Some(HubFrame::Error(_))));

    // After all that the broker is offline and nothing was recorded for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, broker) = hub.call("GET", &format!("/v1/brokers/{id}"), None).await;
    assert_eq!(broker["status"], "offline");
    hub.shutdown().await;
}

/// A drain claims intents and messages at once. When the intents claim
/// fails (here: a trigger refuses every update of an intent, and another
/// agent has one pending), the messages the other claim got must still go
/// out now, not wait in flight for their lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_messages_go_out_when_the_intents_claim_fails() {
    use sqlx::Connection;

    let hub = TestHub::start(TestDb::postgres().await).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    // The create intent goes out first; answer it so no intent is pending.
    let create = match broker.recv().await.expect("frame") {
        HubFrame::Dispatch(d) => d.id,
        other => panic!("expected the create dispatch, got {other:?}"),
    };
    broker
        .send(&BrokerFrame::Result(DispatchResult {
            dispatch_id: create,
            ok: true,
            result: Some(json!({ "phase": "stopped" })),
            error: None,
            code: None,
        }))
        .await;
    hub.wait_until(&format!("/v1/dispatches/{create}"), |d| {
        d["state"] == "done"
    })
    .await;

    let mut admin = sqlx::PgConnection::connect(hub.db.url()).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_claims() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'the intents claim fails'; END $$;
         CREATE TRIGGER refuse_claims BEFORE UPDATE ON dispatch_intents
             FOR EACH ROW EXECUTE FUNCTION refuse_claims();",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    // Another agent's pending start: the intents claim tries it, and fails.
    let other = hub.agent(&id, "other").await;
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{other}/start?wait=false"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/messages"),
            Some(json!({ "body": "through" })),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let got = tokio::time::timeout(Duration::from_secs(5), broker.recv())
        .await
        .expect("the message must go out while the intents claim fails");
    let Some(HubFrame::Message(got)) = got else {
        panic!("expected the message, got {got:?}");
    };
    assert_eq!(got.body, json!("through"));
    sqlx::raw_sql("DROP TRIGGER refuse_claims ON dispatch_intents")
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    hub.shutdown().await;
}
