//! `GET /v1/events` from the durable event log: ids, `Last-Event-ID`
//! replay on another replica and after a restart, `recovered: false` past
//! retention, and the broker and message events.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{TOKEN, TestHub, fast_config};
use serde_json::{Value, json};
use switchyard_hub::HubConfig;
use switchyard_proto::HubFrame;
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::RawBroker;

switchyard_testkit::on_both_backends!(
    a_client_resuming_after_a_restart_gets_exactly_what_it_missed,
    past_retention_a_resuming_client_is_told_it_missed_events,
    brokers_and_messages_have_events,
);

/// One server-sent event.
#[derive(Clone, Debug, PartialEq)]
struct Sse {
    id: Option<i64>,
    kind: String,
    data: Value,
}

/// An open `GET /v1/events` stream, parsed.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(hub: &TestHub, query: &str, last_event_id: Option<&str>) -> Stream {
        let mut request = hub
            .http
            .get(hub.url(&format!("/v1/events{query}")))
            .bearer_auth(TOKEN);
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        Stream {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped); fails after 10 s.
    async fn next(&mut self) -> Sse {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse {
                    id: None,
                    kind: "message".into(),
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event.kind = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                event.data = serde_json::from_str(&data).unwrap();
                return event;
            }
            let chunk = tokio::time::timeout_at(until, self.response.chunk())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .expect("the stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Events until one of `kind` (included).
    async fn until(&mut self, kind: &str) -> Vec<Sse> {
        let mut seen = Vec::new();
        loop {
            let event = self.next().await;
            let done = event.kind == kind;
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}

/// A broker on a raw socket that acks every message.
async fn acking_broker(hub: &TestHub, id: &str, secret: &str) -> tokio::task::JoinHandle<()> {
    let mut broker = RawBroker::connect(&hub.base, id, secret).await;
    tokio::spawn(async move {
        while let Some(frame) = broker.recv().await {
            match frame {
                HubFrame::Message(m) => broker.ack(m.id).await,
                HubFrame::Dispatch(d) => broker.done(d.id).await,
                _ => {}
            }
        }
    })
}

async fn send(hub: &TestHub, agent: &str, body: Value) -> String {
    let (status, sent) = hub
        .call("POST", &format!("/v1/agents/{agent}/messages"), Some(body))
        .await;
    assert_eq!(status, 202, "{sent}");
    sent["id"].as_str().unwrap().to_owned()
}

/// Every event in the log, as the store holds it: what a client that
/// never missed anything would have seen.
async fn whole_log(hub: &TestHub) -> Vec<i64> {
    hub.store
        .events_after(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// Reads from `stream` as many events as the log holds after
/// `last_seen`, and checks they are exactly those, in order. Returns the
/// missed ids and the events read.
async fn exactly_the_missed_events(
    hub: &TestHub,
    stream: &mut Stream,
    last_seen: i64,
) -> (Vec<i64>, Vec<Sse>) {
    let missed: Vec<i64> = whole_log(hub)
        .await
        .into_iter()
        .filter(|id| *id > last_seen)
        .collect();
    let mut got = Vec::new();
    for _ in &missed {
        got.push(stream.next().await);
    }
    assert_eq!(
        got.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>(),
        missed,
        "exactly the missed events, in order: {got:?}"
    );
    (missed, got)
}

/// The message ids of the `message_delivered` events among `events`.
fn delivered(events: &[Sse]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e.kind == "message_delivered")
        .map(|e| e.data["message"]["id"].as_str().unwrap())
        .collect()
}

/// Waits until the log holds `n` message_delivered events.
async fn wait_for_deliveries(hub: &TestHub, n: usize) {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = hub.store.events_after(0, 1000).await.unwrap();
        if log.iter().filter(|e| e.kind == "message_delivered").count() >= n {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "{log:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_client_resuming_after_a_restart_gets_exactly_what_it_missed(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut watch = Stream::open(&hub, "", None).await;
    let broker = acking_broker(&hub, &id, &secret).await;
    let online = watch.until("broker_online").await;
    let last_seen = online.last().unwrap().id.unwrap();
    drop(watch);

    // While the client is away: messages delivered, then the replica
    // stops (its broker goes offline) and a new process starts.
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(send(&hub, &agent, json!({ "body": n })).await);
    }
    wait_for_deliveries(&hub, 5).await;
    broker.abort();
    let TestHub {
        db, hub: running, ..
    } = hub;
    running.unwrap().shutdown().await;
    let hub = TestHub::start_with(db, fast_config()).await;
    send(&hub, &agent, json!({ "body": "after restart" })).await;

    let mut watch = Stream::open(&hub, "", Some(&last_seen.to_string())).await;
    let resume = watch.next().await;
    assert_eq!(resume.kind, "resume");
    assert_eq!(resume.id, None, "a resume event keeps the client's last id");
    assert_eq!(resume.data["recovered"], true, "{resume:?}");
    assert_eq!(resume.data["last_event_id"], last_seen);
    let (missed, got) = exactly_the_missed_events(&hub, &mut watch, last_seen).await;
    assert_eq!(delivered(&got), sent, "{got:?}");
    assert!(
        got.iter().any(|e| e.kind == "broker_offline"),
        "the stopping replica logged its broker going offline: {got:?}"
    );

    // Then live: a broker comes online on the new process.
    let broker = acking_broker(&hub, &id, &secret).await;
    let live = watch.until("broker_online").await;
    assert!(
        live.iter()
            .all(|e| e.id.unwrap() > missed[missed.len() - 1])
    );
    broker.abort();
    hub.shutdown().await;
}

async fn past_retention_a_resuming_client_is_told_it_missed_events(db: TestDb) {
    let config = HubConfig {
        event_retention: Duration::ZERO,
        ..fast_config()
    };
    let hub = TestHub::start_with(db, config).await;
    let (id, secret) = hub.broker("edge").await;
    // Events: the broker online, then offline.
    drop(RawBroker::connect(&hub.base, &id, &secret).await);
    // The sweeper prunes everything older than zero seconds.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let horizon = loop {
        let bounds = hub.store.event_bounds().await.unwrap();
        if bounds.pruned_through > 0 {
            break bounds;
        }
        assert!(tokio::time::Instant::now() < until, "never pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    for (last, why) in [
        (0, "before the pruned horizon"),
        (horizon.last + 1000, "an id this hub never gave"),
    ] {
        let mut watch = Stream::open(&hub, "", Some(&last.to_string())).await;
        let resume = watch.next().await;
        assert_eq!(resume.kind, "resume", "{why}");
        assert_eq!(resume.data["recovered"], false, "{why}: {resume:?}");
    }

    for bad in ["-1", "12a", "99999999999999999999"] {
        let resp = hub
            .http
            .get(hub.url("/v1/events"))
            .bearer_auth(TOKEN)
            .header("Last-Event-ID", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "Last-Event-ID {bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    }
    hub.shutdown().await;
}

async fn brokers_and_messages_have_events(db: TestDb) {
    let config = HubConfig {
        max_attempts: 1,
        ..fast_config()
    };
    let hub = TestHub::start_with(db, config).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut watch = Stream::open(&hub, &format!("?agent={agent}"), None).await;
    let mut all = Stream::open(&hub, "", None).await;

    // Online, a message delivered, offline.
    let broker = acking_broker(&hub, &id, &secret).await;
    let online = all.until("broker_online").await;
    assert_eq!(online.last().unwrap().data["broker"]["id"], id.as_str());
    let delivered = send(&hub, &agent, json!({ "body": 1 })).await;
    let event = watch.until("message_delivered").await.pop().unwrap();
    assert_eq!(event.data["message"]["id"], delivered.as_str());
    assert_eq!(event.data["message"]["state"], "delivered");
    broker.abort();
    let offline = all.until("broker_offline").await.pop().unwrap();
    assert_eq!(offline.data["broker"]["id"], id.as_str());
    assert_eq!(offline.data["broker"]["status"], "offline", "{offline:?}");

    // Expired: a one-second TTL with the broker away.
    let expired = send(&hub, &agent, json!({ "body": 2, "ttl_secs": 1 })).await;
    let event = watch.until("message_expired").await.pop().unwrap();
    assert_eq!(event.data["message"]["id"], expired.as_str());

    // Failed: claimed once (max_attempts 1) by a session that ends by
    // itself without acking; the next session dead-letters it.
    let failing = send(&hub, &agent, json!({ "body": 3 })).await;
    let mut silent = RawBroker::connect(&hub.base, &id, &secret).await;
    loop {
        if let Some(HubFrame::Message(m)) = silent.recv().await {
            assert_eq!(m.id.to_string(), failing);
            break;
        }
    }
    drop(silent);
    all.until("broker_offline").await;
    let again = RawBroker::connect(&hub.base, &id, &secret).await;
    let event = watch.until("message_failed").await.pop().unwrap();
    assert_eq!(event.data["message"]["id"], failing.as_str());
    let (_, row) = hub
        .call("GET", &format!("/v1/messages/{failing}"), None)
        .await;
    assert_eq!(row["state"], "failed", "{row}");
    drop(again);
    hub.shutdown().await;
}

/// Two replicas on one PostgreSQL: a client that read events on A and
/// reconnects to B with its last id gets exactly what it missed, whoever
/// wrote it, then live events written on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_resuming_on_another_replica_gets_exactly_what_it_missed() {
    let a = TestHub::start(TestDb::postgres().await).await;
    let b = {
        let database = switchyard_store::open_database(a.db.url()).await.unwrap();
        let hub = switchyard_hub::Hub::start(fast_config(), database)
            .await
            .unwrap();
        TestHub {
            base: format!("http://{}", hub.addr()),
            db: TestDb::sqlite(), // unused; the database belongs to `a`
            store: a.store.clone(),
            hub: Some(hub),
            http: reqwest::Client::new(),
        }
    };
    let (id, secret) = a.broker("edge").await;
    let agent = a.agent(&id, "worker").await;
    let mut on_a = Stream::open(&a, "", None).await;
    let broker = acking_broker(&b, &id, &secret).await;
    let last_seen = on_a.until("broker_online").await.pop().unwrap().id.unwrap();
    drop(on_a);

    let mut sent = Vec::new();
    for n in 0..20 {
        let hub = if n % 2 == 0 { &a } else { &b };
        sent.push(send(hub, &agent, json!({ "body": n })).await);
    }
    wait_for_deliveries(&a, 20).await;
    let mut on_b = Stream::open(&b, "", Some(&last_seen.to_string())).await;
    assert_eq!(on_b.next().await.data["recovered"], true);
    let (missed, got) = exactly_the_missed_events(&a, &mut on_b, last_seen).await;
    assert_eq!(delivered(&got), sent, "{got:?}");

    // Live on B: a message sent and delivered through A's API.
    let live = send(&a, &agent, json!({ "body": "live" })).await;
    let event = on_b.until("message_delivered").await.pop().unwrap();
    assert_eq!(event.data["message"]["id"], live.as_str());
    assert!(event.id.unwrap() > *missed.last().unwrap());
    broker.abort();
    b.shutdown().await;
    a.shutdown().await;
}
