//! The poll transport, driven request by request over real HTTP: order,
//! acknowledgement and leases, wake-ups, sessions, ownership and hostile
//! requests.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{TestHub, fast_config};
use serde_json::{Value, json};
use switchyard_hub::HubConfig;
use switchyard_proto::auth::Handshake;
use switchyard_proto::poll::{
    MAX_POLL_FRAMES, MAX_POLL_RESPONSE_BYTES, POLL_HELLO_PATH, POLL_PATH,
};
use switchyard_proto::{BrokerFrame, ErrorCode, ErrorFrame, HubFrame};
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::RawBroker;
use switchyard_testkit::poll::{PollBroker, ack, done, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

switchyard_testkit::on_both_backends!(
    a_poll_returns_work_in_order_and_acknowledged_work_is_not_sent_again,
    work_a_poll_returned_and_the_broker_did_not_acknowledge_is_sent_again_in_order,
    a_received_dispatch_is_not_sent_again_until_its_result,
    work_a_poll_returned_goes_back_to_pending_when_its_lease_runs_out,
    a_waiting_poll_is_woken_by_new_work_before_the_backstop,
    a_newer_session_on_either_transport_supersedes_a_poll_session,
    a_replayed_poll_request_is_refused,
    reports_about_another_brokers_work_are_refused_and_repeated_acks_change_nothing,
    a_poll_session_that_stops_polling_goes_offline,
    a_poll_answer_is_bounded_in_bytes_and_the_rest_follows_in_order,
    hostile_poll_requests_are_refused_with_a_clear_status,
);

async fn send(hub: &TestHub, agent: &str, body: Value) -> String {
    let (status, sent) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/messages"),
            Some(json!({ "body": body })),
        )
        .await;
    assert_eq!(status, 202, "{sent}");
    sent["id"].as_str().unwrap().to_owned()
}

fn messages(frames: &[HubFrame]) -> Vec<(Uuid, Value)> {
    frames
        .iter()
        .filter_map(|f| match f {
            HubFrame::Message(m) => Some((m.id, m.body.clone())),
            _ => None,
        })
        .collect()
}

fn dispatches(frames: &[HubFrame]) -> Vec<Uuid> {
    frames
        .iter()
        .filter_map(|f| match f {
            HubFrame::Dispatch(d) => Some(d.id),
            _ => None,
        })
        .collect()
}

/// Polls the agents' `create` dispatches (the first work of a new agent,
/// which its messages wait for) and answers them.
async fn answer_creates(poller: &PollBroker, agents: usize) {
    let mut created = Vec::new();
    while created.len() < agents {
        let frames = poller.poll(vec![], 2000).await.unwrap();
        for frame in frames {
            match frame {
                HubFrame::Dispatch(d) if d.op == switchyard_proto::Op::Create => created.push(d.id),
                other => panic!("expected only create dispatches, got {other:?}"),
            }
        }
    }
    let results = created.iter().map(|id| done(*id)).collect();
    let answers = poller.report(results).await.unwrap();
    assert!(answers.is_empty(), "{answers:?}");
}

async fn message_state(hub: &TestHub, id: Uuid) -> Value {
    hub.call("GET", &format!("/v1/messages/{id}"), None).await.1
}

async fn a_poll_returns_work_in_order_and_acknowledged_work_is_not_sent_again(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    for n in 0..5 {
        send(&hub, &agent, json!(n)).await;
    }
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    answer_creates(&poller, 1).await;
    let got = messages(&poller.poll(vec![], 0).await.unwrap());
    let bodies: Vec<Value> = got.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(bodies, (0..5).map(|n| json!(n)).collect::<Vec<_>>());

    let ids: Vec<Uuid> = got.iter().map(|(id, _)| *id).collect();
    let next = poller
        .poll(vec![ack(ids.clone(), vec![])], 0)
        .await
        .unwrap();
    assert!(next.is_empty(), "acknowledged work came again: {next:?}");
    for id in ids {
        assert_eq!(message_state(&hub, id).await["state"], "delivered");
    }
    let (_, row) = hub
        .call("GET", &format!("/v1/brokers/{broker}"), None)
        .await;
    assert_eq!(row["status"], "online", "{row}");
    assert_eq!(row["transport"], "poll", "{row}");
    hub.shutdown().await;
}

/// An answer that never reached the broker (or a broker that did not get
/// to its acks) costs one poll: the next one sends it again, in order,
/// before anything newer.
async fn work_a_poll_returned_and_the_broker_did_not_acknowledge_is_sent_again_in_order(
    db: TestDb,
) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    for n in 0..3 {
        send(&hub, &agent, json!(n)).await;
    }
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    answer_creates(&poller, 1).await;
    let lost = messages(&poller.poll(vec![], 0).await.unwrap());
    assert_eq!(lost.len(), 3);
    send(&hub, &agent, json!(3)).await;
    let again = messages(&poller.poll(vec![], 0).await.unwrap());
    let bodies: Vec<Value> = again.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(bodies, vec![json!(0), json!(1), json!(2), json!(3)]);
    assert_eq!(again[..3], lost[..], "the same messages, with the same ids");

    let ids = again.iter().map(|(id, _)| *id).collect();
    assert!(
        poller
            .poll(vec![ack(ids, vec![])], 0)
            .await
            .unwrap()
            .is_empty()
    );
    hub.shutdown().await;
}

async fn a_received_dispatch_is_not_sent_again_until_its_result(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    answer_creates(&poller, 1).await;
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/start?wait=false"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let first = dispatches(&poller.poll(vec![], 0).await.unwrap());
    assert_eq!(first.len(), 1);
    // Not acknowledged: sent again.
    let again = dispatches(&poller.poll(vec![], 0).await.unwrap());
    assert_eq!(again, first);
    // Received: it stays in flight, and no poll sends it again.
    let quiet = poller
        .poll(vec![ack(vec![], first.clone())], 300)
        .await
        .unwrap();
    assert!(quiet.is_empty(), "{quiet:?}");
    let (_, row) = hub
        .call("GET", &format!("/v1/dispatches/{}", first[0]), None)
        .await;
    assert_eq!(row["state"], "in_progress", "{row}");
    // A message written after the start waits for its result.
    send(&hub, &agent, json!("after")).await;
    assert!(poller.poll(vec![], 300).await.unwrap().is_empty());
    let answers = poller.report(vec![done(first[0])]).await.unwrap();
    assert!(answers.is_empty(), "{answers:?}");
    let after = messages(&poller.poll(vec![], 2000).await.unwrap());
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1, json!("after"));
    let (_, row) = hub
        .call("GET", &format!("/v1/dispatches/{}", first[0]), None)
        .await;
    assert_eq!(row["state"], "done", "{row}");
    hub.shutdown().await;
}

/// The sweeper, not the next poll, returns work whose lease ran out: the
/// broker may never poll again on this session.
async fn work_a_poll_returned_goes_back_to_pending_when_its_lease_runs_out(db: TestDb) {
    let config = HubConfig {
        poll_lease: Duration::from_secs(1),
        ..fast_config()
    };
    let hub = TestHub::start_with(db, config).await;
    let (broker, secret) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let id: Uuid = send(&hub, &agent, json!("leased")).await.parse().unwrap();
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    assert_eq!(poller.terms.lease_ms, 1000);
    answer_creates(&poller, 1).await;
    let got = messages(&poller.poll(vec![], 0).await.unwrap());
    assert_eq!(got[0].0, id);
    assert_eq!(message_state(&hub, id).await["state"], "dispatched");
    let row = hub
        .wait_until(&format!("/v1/messages/{id}"), |m| m["state"] == "pending")
        .await;
    assert_eq!(row["attempts"], 1, "the lost lease counts: {row}");
    let again = messages(&poller.poll(vec![], 0).await.unwrap());
    assert_eq!(again[0].0, id, "delivered again");
    poller.poll(vec![ack(vec![id], vec![])], 0).await.unwrap();
    assert_eq!(message_state(&hub, id).await["state"], "delivered");
    hub.shutdown().await;
}

async fn a_waiting_poll_is_woken_by_new_work_before_the_backstop(db: TestDb) {
    let config = HubConfig {
        drain_backstop: Duration::from_secs(30),
        ..fast_config()
    };
    let hub = TestHub::start_with(db, config).await;
    let (broker, secret) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    answer_creates(&poller, 1).await;
    let waiting = tokio::spawn({
        let poller = poller.clone();
        async move {
            let frames = poller.poll(vec![], 10_000).await.unwrap();
            (frames, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    send(&hub, &agent, json!("wake")).await;
    let (frames, answered) = waiting.await.unwrap();
    let took = answered - sent;
    println!("a waiting poll answered {took:?} after the message was written");
    assert_eq!(messages(&frames)[0].1, json!("wake"));
    assert!(took < Duration::from_secs(2), "{took:?}");
    hub.shutdown().await;
}

async fn a_newer_session_on_either_transport_supersedes_a_poll_session(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let old = PollBroker::hello(&hub.base, &broker, &secret).await;
    let new = PollBroker::hello(&hub.base, &broker, &secret).await;
    answer_creates(&new, 1).await;
    let refused = old.poll(vec![], 0).await.unwrap_err();
    assert_eq!(refused.status, 409);
    assert_eq!(refused.body["error"]["code"], "superseded");
    assert_eq!(
        old.report(vec![]).await.unwrap_err().status,
        409,
        "a report names its session too"
    );

    // Poll -> socket: what the poll returned and nobody acknowledged
    // goes down the socket.
    let id = send(&hub, &agent, json!("switch")).await;
    assert_eq!(messages(&new.poll(vec![], 0).await.unwrap()).len(), 1);
    let mut socket = RawBroker::connect(&hub.base, &broker, &secret).await;
    match socket.recv().await {
        Some(HubFrame::Message(m)) => {
            assert_eq!(m.id.to_string(), id);
            socket.ack(m.id).await;
        }
        other => panic!("expected the message again, got {other:?}"),
    }
    assert_eq!(new.poll(vec![], 0).await.unwrap_err().status, 409);

    // Socket -> poll: the socket is told it was superseded.
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    let mut error = None;
    while let Some(frame) = socket.recv().await {
        if let HubFrame::Error(e) = frame {
            error = Some(e.code);
        }
    }
    assert_eq!(error, Some(ErrorCode::Superseded));
    let quiet = poller.poll(vec![], 0).await.unwrap();
    assert!(quiet.is_empty(), "acked on the socket: {quiet:?}");
    hub.shutdown().await;
}

async fn a_replayed_poll_request_is_refused(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    let handshake = Handshake::new(&broker, &secret);
    let body = json!({ "session_id": poller.session_id, "wait_ms": 0 }).to_string();
    let (status, text) = post(&poller.http, &hub.base, POLL_PATH, &handshake, body.clone()).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = post(&poller.http, &hub.base, POLL_PATH, &handshake, body).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("replay"), "{text}");
    let wrong = Handshake::new(&broker, "not-the-secret");
    let hello = r#"{"v":1,"type":"hello","agents":[]}"#.to_owned();
    let (status, _) = post(&poller.http, &hub.base, POLL_HELLO_PATH, &wrong, hello).await;
    assert_eq!(status, 401);
    hub.shutdown().await;
}

async fn reports_about_another_brokers_work_are_refused_and_repeated_acks_change_nothing(
    db: TestDb,
) {
    let hub = TestHub::start(db).await;
    let (mine, my_secret) = hub.broker("mine").await;
    let (theirs, their_secret) = hub.broker("theirs").await;
    let their_agent = hub.agent(&theirs, "worker").await;
    let id: Uuid = send(&hub, &their_agent, json!("theirs"))
        .await
        .parse()
        .unwrap();
    let me = PollBroker::hello(&hub.base, &mine, &my_secret).await;
    let them = PollBroker::hello(&hub.base, &theirs, &their_secret).await;
    answer_creates(&them, 1).await;
    assert_eq!(messages(&them.poll(vec![], 0).await.unwrap())[0].0, id);

    // Another broker's receipt is refused too, and does not keep the
    // message from being sent again.
    let answers = me.report(vec![ack(vec![], vec![id])]).await.unwrap();
    assert!(
        matches!(
            &answers[..],
            [HubFrame::Error(ErrorFrame {
                code: ErrorCode::Forbidden,
                ..
            })]
        ),
        "{answers:?}"
    );
    assert_eq!(
        messages(&them.poll(vec![], 0).await.unwrap())[0].0,
        id,
        "not received, so sent again"
    );
    let answers = me.report(vec![ack(vec![id], vec![])]).await.unwrap();
    assert!(
        matches!(
            &answers[..],
            [HubFrame::Error(ErrorFrame {
                code: ErrorCode::Forbidden,
                ..
            })]
        ),
        "{answers:?}"
    );
    assert_eq!(message_state(&hub, id).await["state"], "dispatched");
    let status = BrokerFrame::Status(switchyard_proto::AgentStatus {
        agent_id: their_agent.parse().unwrap(),
        phase: switchyard_proto::Phase::Error,
        seq: 1,
        exit_code: Some(1),
        detail: None,
    });
    let answers = me.report(vec![status]).await.unwrap();
    assert_eq!(answers.len(), 1, "{answers:?}");
    let (_, agent) = hub
        .call("GET", &format!("/v1/agents/{their_agent}"), None)
        .await;
    assert_eq!(agent["phase"], "created", "{agent}");

    for _ in 0..2 {
        let answers = them.report(vec![ack(vec![id], vec![])]).await.unwrap();
        assert!(answers.is_empty(), "{answers:?}");
        assert_eq!(message_state(&hub, id).await["state"], "delivered");
    }
    hub.shutdown().await;
}

async fn a_poll_session_that_stops_polling_goes_offline(db: TestDb) {
    // Heartbeat 1 s: the session lapses after 3 s without a request.
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    assert_eq!(poller.terms.lapse_ms, 3000);
    let path = format!("/v1/brokers/{broker}");
    let (_, row) = hub.call("GET", &path, None).await;
    assert_eq!(row["status"], "online");
    let started = Instant::now();
    hub.wait_until(&path, |b| b["status"] == "offline").await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "lapsed too early"
    );
    let refused = poller.poll(vec![], 0).await.unwrap_err();
    assert_eq!(refused.status, 409, "a lapsed session must say hello again");
    hub.shutdown().await;
}

async fn a_poll_answer_is_bounded_in_bytes_and_the_rest_follows_in_order(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let big = "x".repeat(200 * 1024);
    for n in 0..30 {
        send(&hub, &agent, json!({ "n": n, "pad": big })).await;
    }
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    answer_creates(&poller, 1).await;
    let mut seen = Vec::new();
    let mut acks = vec![];
    for _ in 0..10 {
        let frames = poller.poll(acks, 0).await.unwrap();
        let got = messages(&frames);
        if got.is_empty() {
            break;
        }
        let bytes: usize = got.iter().map(|(_, b)| b.to_string().len()).sum();
        assert!(
            bytes <= MAX_POLL_RESPONSE_BYTES,
            "{bytes} bytes in one answer"
        );
        assert!(got.len() < 30, "one answer held all 30");
        seen.extend(got.iter().map(|(_, b)| b["n"].as_i64().unwrap()));
        acks = vec![ack(got.iter().map(|(id, _)| *id).collect(), vec![])];
    }
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
    hub.shutdown().await;
}

async fn hostile_poll_requests_are_refused_with_a_clear_status(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("edge").await;
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    let raw = |path: &'static str, body: String| {
        let poller = poller.clone();
        async move {
            let handshake = Handshake::new(&poller.broker, &poller.secret);
            post(&poller.http, &poller.base, path, &handshake, body).await
        }
    };
    let (status, text) = raw(POLL_PATH, "not json".into()).await;
    assert_eq!(status, 400, "{text}");
    let (status, _) = raw(POLL_PATH, json!({ "session_id": "nope" }).to_string()).await;
    assert_eq!(status, 400);
    let (status, _) = raw(
        POLL_PATH,
        json!({ "session_id": poller.session_id, "extra": 1 }).to_string(),
    )
    .await;
    assert_eq!(status, 400, "unknown fields are refused");
    let future = json!({ "session_id": poller.session_id,
                         "frames": [{ "v": 2, "type": "ack", "message_ids": [] }] });
    let (status, text) = raw(POLL_PATH, future.to_string()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("version"), "{text}");
    let many: Vec<Value> = (0..=MAX_POLL_FRAMES)
        .map(|_| json!({ "v": 1, "type": "ack", "message_ids": [] }))
        .collect();
    let (status, _) = raw(
        POLL_PATH,
        json!({ "session_id": poller.session_id, "frames": many }).to_string(),
    )
    .await;
    assert_eq!(status, 413);
    // Larger than the limit: 413, whether or not the hub reads it all
    // (the write may fail once the hub has answered and closed).
    let addr = hub.base.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let size = 5 << 20;
    let head = format!(
        "POST {POLL_PATH} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {size}\r\n\r\n"
    );
    let writing = tokio::spawn(async move {
        let _ = write.write_all(head.as_bytes()).await;
        let _ = write.write_all(&vec![b'x'; size]).await;
        write
    });
    let mut answer = vec![0; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), read.read(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    drop(writing);
    let (status, _) = raw(
        POLL_HELLO_PATH,
        json!({ "v": 1, "type": "ack" }).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    let (status, text) = raw(
        POLL_PATH,
        json!({ "session_id": Uuid::new_v4(), "wait_ms": 0 }).to_string(),
    )
    .await;
    assert_eq!(status, 409, "an unknown session: {text}");
    let unsigned = poller
        .http
        .post(format!("{}{POLL_PATH}", hub.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    hub.shutdown().await;
}
