//! The hostile-input suite: inputs no polite client sends, each answered
//! with its documented 4xx, and nothing written. Every case ends by
//! checking that the agent's queue and dispatches are untouched. (The
//! classes with their own tests elsewhere: bodies over the limits and
//! payloads no frame can carry, NUL bytes, bad queries and paths, reused
//! idempotency keys, bad tokens and handshakes, and frames from another
//! broker: `api.rs`, `idempotency.rs`, `control_channel.rs`, `limits.rs`.)
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{TOKEN, TestHub};
use serde_json::{Value, json};
use switchyard_testkit::TestDb;

switchyard_testkit::on_both_backends!(
    json_nested_beyond_the_parser_limit_is_refused_and_changes_nothing,
    malformed_idempotency_keys_are_refused_and_change_nothing,
    batches_out_of_bounds_or_repeating_a_key_are_refused_whole,
    absurd_references_and_names_are_refused_and_change_nothing,
);

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// Nothing was written for `agent`: its first message still gets seq 1,
/// and its only dispatch is its create.
async fn untouched(hub: &TestHub, broker: &str, agent: &str) {
    let (status, sent) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/messages"),
            Some(json!({"body": "probe"})),
        )
        .await;
    assert_eq!((status, &sent["seq"]), (202, &json!(1)), "{sent}");
    let (_, dispatches) = hub
        .call("GET", &format!("/v1/dispatches?broker_id={broker}"), None)
        .await;
    let ops: Vec<&str> = dispatches
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["op"].as_str())
        .collect();
    assert_eq!(ops, ["create"], "{dispatches}");
}

/// A body nested deeper than the JSON parser follows (128 levels) cannot
/// exhaust the stack: 400, nothing written.
async fn json_nested_beyond_the_parser_limit_is_refused_and_changes_nothing(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    for path in [
        format!("/v1/agents/{agent}/messages"),
        "/v1/messages".to_owned(),
    ] {
        let resp = hub
            .http
            .post(hub.url(&path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(format!(r#"{{"body": {deep}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(code(&body), "bad_request", "{body}");
    }
    untouched(&hub, &broker, &agent).await;
    hub.shutdown().await;
}

/// An `Idempotency-Key` that is empty, too long, or not printable ASCII is
/// refused with 400 before anything is written, on every endpoint that
/// takes one.
async fn malformed_idempotency_keys_are_refused_and_change_nothing(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let too_long = "k".repeat(256);
    let keys: [&[u8]; 4] = [b"", too_long.as_bytes(), b"with space", b"caf\xc3\xa9"];
    for key in keys {
        let value = reqwest::header::HeaderValue::from_bytes(key).unwrap();
        for (method, path, body) in [
            (
                "POST",
                format!("/v1/agents/{agent}/messages"),
                Some(json!({"body": 1})),
            ),
            (
                "POST",
                "/v1/messages".to_owned(),
                Some(json!({"messages": [{"agent": agent, "body": 1}]})),
            ),
            ("POST", format!("/v1/agents/{agent}/start?wait=false"), None),
            ("DELETE", format!("/v1/agents/{agent}?wait=false"), None),
        ] {
            let mut req = hub
                .http
                .request(method.parse().unwrap(), hub.url(&path))
                .bearer_auth(TOKEN)
                .header("idempotency-key", value.clone());
            if let Some(body) = body {
                req = req.json(&body);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 400, "{method} {path} with key {key:?}");
        }
    }
    untouched(&hub, &broker, &agent).await;
    hub.shutdown().await;
}

/// A batch must hold 1 to 1,000 messages and may not use one key twice:
/// otherwise 422 and none of it is written.
async fn batches_out_of_bounds_or_repeating_a_key_are_refused_whole(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let item = |i: usize| json!({"agent": agent, "body": i});
    let too_many: Vec<Value> = (0..1001).map(item).collect();
    let repeated = vec![
        json!({"agent": agent, "body": 1, "idempotency_key": "same"}),
        json!({"agent": agent, "body": 2, "idempotency_key": "same"}),
    ];
    for messages in [vec![], too_many, repeated] {
        let n = messages.len();
        let (status, body) = hub
            .call(
                "POST",
                "/v1/messages",
                Some(json!({ "messages": messages })),
            )
            .await;
        assert_eq!((status, code(&body)), (422, "invalid"), "{n} items: {body}");
    }
    untouched(&hub, &broker, &agent).await;
    hub.shutdown().await;
}

/// References and names of absurd length or alphabet get a 404 or 422,
/// never a 5xx, and create nothing.
async fn absurd_references_and_names_are_refused_and_change_nothing(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let long = "a".repeat(8 * 1024);
    for path in [
        format!("/v1/agents/{long}"),
        format!("/v1/agents/{long}/start"),
        format!("/v1/agents/{long}/messages"),
        format!("/v1/brokers/{long}"),
    ] {
        let method = if path.ends_with("/start") || path.ends_with("/messages") {
            "POST"
        } else {
            "GET"
        };
        let body = path.ends_with("/messages").then(|| json!({"body": 1}));
        let (status, answer) = hub.call(method, &path, body).await;
        assert_eq!(
            (status, code(&answer)),
            (404, "not_found"),
            "{method} {:.40}",
            path
        );
    }
    for name in [long.as_str(), "名前", "white space", "a/b", "..", ""] {
        let (status, answer) = hub
            .call(
                "POST",
                "/v1/agents",
                Some(json!({"name": name, "broker_id": broker, "command": ["true"]})),
            )
            .await;
        assert_eq!(
            (status, code(&answer)),
            (422, "invalid"),
            "{name:.20}: {answer}"
        );
        let (status, answer) = hub
            .call("POST", "/v1/brokers", Some(json!({"name": name})))
            .await;
        assert_eq!(
            (status, code(&answer)),
            (422, "invalid"),
            "{name:.20}: {answer}"
        );
    }
    let (_, agents) = hub.call("GET", "/v1/agents", None).await;
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    untouched(&hub, &broker, &agent).await;
    hub.shutdown().await;
}
