//! Files sent with a message (`multipart/form-data`), fetched by a broker
//! over real HTTP: stored whole or not at all, served only to their
//! broker, removed once their message is final.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{TOKEN, TestHub, fast_config};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use switchyard_hub::HubConfig;
use switchyard_proto::auth::Handshake;
use switchyard_proto::{ATTACHMENT_PATH, AttachmentRef, HubFrame, Op};
use switchyard_testkit::TestDb;
use switchyard_testkit::poll::{PollBroker, ack, done};

switchyard_testkit::on_both_backends!(
    a_message_with_files_is_fetched_whole_and_only_by_its_broker,
    files_over_the_limit_are_refused_and_nothing_is_written,
    the_files_of_an_expired_message_are_removed_from_storage,
    a_malformed_form_is_refused_with_a_clear_status,
);

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn form(message: Value, files: &[(&str, Vec<u8>)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new().text("message", message.to_string());
    for (name, data) in files {
        let part = reqwest::multipart::Part::bytes(data.clone()).file_name(name.to_string());
        form = form.part("file", part);
    }
    form
}

async fn upload(hub: &TestHub, agent: &str, form: reqwest::multipart::Form) -> (u16, Value) {
    let response = hub
        .http
        .post(hub.url(&format!("/v1/agents/{agent}/messages")))
        .bearer_auth(TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A broker's signed fetch: status and bytes.
async fn fetch(hub: &TestHub, broker: &str, secret: &str, id: &str) -> (u16, Vec<u8>) {
    let mut request = hub.http.get(hub.url(&ATTACHMENT_PATH.replace("{id}", id)));
    for (name, value) in Handshake::new(broker, secret).headers() {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

/// A poll session of a new broker with one agent whose create is answered.
async fn polling_broker(hub: &TestHub, name: &str) -> (String, String, String, PollBroker) {
    let (broker, secret) = hub.broker(name).await;
    let agent = hub.agent(&broker, "worker").await;
    let poller = PollBroker::hello(&hub.base, &broker, &secret).await;
    let frames = poller.poll(vec![], 2000).await.unwrap();
    let Some(HubFrame::Dispatch(create)) = frames.first() else {
        panic!("expected the create dispatch, got {frames:?}");
    };
    assert_eq!(create.op, Op::Create);
    assert!(
        poller
            .report(vec![done(create.id)])
            .await
            .unwrap()
            .is_empty()
    );
    (broker, secret, agent, poller)
}

async fn a_message_with_files_is_fetched_whole_and_only_by_its_broker(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret, agent, poller) = polling_broker(&hub, "edge").await;
    let (other, other_secret) = hub.broker("other").await;
    // Bigger than one stored chunk, and not a multiple of it.
    let big: Vec<u8> = (0..(2_621_440 + 17)).map(|i| (i % 251) as u8).collect();
    let small = b"root:x:0:0".to_vec();
    let files = [
        ("report.bin", big.clone()),
        ("../../etc/passwd", small.clone()),
    ];
    let (status, sent) = upload(&hub, &agent, form(json!({ "body": "two files" }), &files)).await;
    assert_eq!(status, 202, "{sent}");
    let names: Vec<&str> = sent["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["report.bin", "passwd"], "names are sanitized");
    assert_eq!(
        hub.store.attachment_bytes().await.unwrap(),
        (big.len() + small.len()) as i64
    );

    let frames = poller.poll(vec![], 2000).await.unwrap();
    let Some(HubFrame::Message(message)) = frames.first() else {
        panic!("expected the message, got {frames:?}");
    };
    assert_eq!(message.body, json!("two files"));
    let refs: &Vec<AttachmentRef> = &message.attachments;
    assert_eq!(refs.len(), 2);
    for (r, data) in refs.iter().zip([&big, &small]) {
        assert_eq!(r.size, data.len() as u64);
        assert_eq!(r.sha256, sha256(data));
        let (status, got) = fetch(&hub, &broker, &secret, &r.id.to_string()).await;
        assert_eq!(status, 200);
        assert_eq!(sha256(&got), r.sha256, "{} arrives whole", r.name);
        let (status, _) = fetch(&hub, &other, &other_secret, &r.id.to_string()).await;
        assert_eq!(status, 404, "another broker's file is not found");
    }
    let (status, _) = fetch(&hub, &broker, &secret, "not-a-uuid").await;
    assert_eq!(status, 404);
    let unsigned = hub
        .http
        .get(hub.url(&ATTACHMENT_PATH.replace("{id}", &refs[0].id.to_string())))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);

    // Acknowledged: the message is delivered and its files are removed.
    poller
        .poll(vec![ack(vec![message.id], vec![])], 0)
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while hub.store.attachment_bytes().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < until, "files never removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = fetch(&hub, &broker, &secret, &refs[0].id.to_string()).await;
    assert_eq!(status, 404, "a delivered message's file is gone");
    hub.shutdown().await;
}

async fn files_over_the_limit_are_refused_and_nothing_is_written(db: TestDb) {
    let config = HubConfig {
        max_attachment_bytes: 1 << 20,
        max_attachments: 2,
        ..fast_config()
    };
    let hub = TestHub::start_with(db, config).await;
    let (_, _, agent, poller) = polling_broker(&hub, "edge").await;
    let message = json!({ "body": "too much" });
    let over = vec![7u8; (1 << 20) + 1];
    let (status, body) = upload(&hub, &agent, form(message.clone(), &[("big", over)])).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    let split = [("a", vec![1u8; 600_000]), ("b", vec![2u8; 600_000])];
    let (status, _) = upload(&hub, &agent, form(message.clone(), &split)).await;
    assert_eq!(status, 413, "the limit is for all of a message's files");
    let three = [("a", vec![1]), ("b", vec![2]), ("c", vec![3])];
    let (status, body) = upload(&hub, &agent, form(message, &three)).await;
    assert_eq!(status, 413, "{body}");
    // A body that fits in a frame alone, but not with two long file names.
    let long_name = "n".repeat(100_000);
    let body = json!({ "body": "x".repeat(switchyard_proto::MAX_FRAME_BYTES - 400) });
    let named = [(long_name.as_str(), vec![1]), (long_name.as_str(), vec![2])];
    let (status, _) = upload(&hub, &agent, form(body, &named)).await;
    assert_eq!(
        status, 413,
        "the body and the file names must fit in one frame"
    );
    assert_eq!(hub.store.attachment_bytes().await.unwrap(), 0);
    let frames = poller.poll(vec![], 300).await.unwrap();
    assert!(frames.is_empty(), "nothing was written: {frames:?}");
    hub.shutdown().await;
}

async fn the_files_of_an_expired_message_are_removed_from_storage(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, secret) = hub.broker("offline").await;
    let agent = hub.agent(&broker, "worker").await;
    let file = [("data.bin", vec![9u8; 100_000])];
    let (status, sent) = upload(
        &hub,
        &agent,
        form(json!({ "body": 1, "ttl_secs": 1 }), &file),
    )
    .await;
    assert_eq!(status, 202, "{sent}");
    let id = sent["attachments"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(hub.store.attachment_bytes().await.unwrap(), 100_000);
    let message = sent["id"].as_str().unwrap();
    hub.wait_until(&format!("/v1/messages/{message}"), |m| {
        m["state"] == "expired"
    })
    .await;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while hub.store.attachment_bytes().await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "expired files never removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = fetch(&hub, &broker, &secret, &id).await;
    assert_eq!(status, 404);
    let metrics = hub.http.get(hub.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        text.lines().any(|l| l == "switchyard_attachment_bytes 0"),
        "the metric says so"
    );
    hub.shutdown().await;
}

async fn a_malformed_form_is_refused_with_a_clear_status(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let no_message = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(vec![1]).file_name("f"),
    );
    let (status, body) = upload(&hub, &agent, no_message).await;
    assert_eq!(status, 400, "{body}");
    let stray = reqwest::multipart::Form::new()
        .text("message", json!({ "body": 1 }).to_string())
        .text("other", "x");
    assert_eq!(upload(&hub, &agent, stray).await.0, 400);
    let bad_json = reqwest::multipart::Form::new().text("message", "{not json");
    assert_eq!(upload(&hub, &agent, bad_json).await.0, 400);
    let unknown =
        reqwest::multipart::Form::new().text("message", json!({ "bogus": 1 }).to_string());
    assert_eq!(upload(&hub, &agent, unknown).await.0, 422);
    let (status, _) = upload(
        &hub,
        "no-such-agent",
        form(json!({ "body": 1 }), &[("f", vec![1])]),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(hub.store.attachment_bytes().await.unwrap(), 0);
    hub.shutdown().await;
}
