//! The idempotency ledger through the API: a key is scoped to the endpoint
//! and the agent, answers only the request that created its row, and is
//! answered at once when that row's work has finished.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{TOKEN, TestHub};
use serde_json::{Value, json};
use switchyard_store::{IntentId, IntentOutcome};
use switchyard_testkit::TestDb;

switchyard_testkit::on_both_backends!(
    a_key_reused_on_another_agent_acts_only_on_the_agent_the_call_names,
    a_key_reused_for_another_body_is_refused_with_422_and_nothing_is_written,
    a_retried_lifecycle_call_whose_dispatch_finished_is_answered_at_once,
);

/// A call with an `Idempotency-Key`; returns status and JSON body.
async fn keyed(
    hub: &TestHub,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = hub
        .http
        .request(method.parse().unwrap(), hub.url(path))
        .bearer_auth(TOKEN)
        .header("idempotency-key", key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// The key of a stop on one agent, reused on a delete of another, used to
/// answer with the stop's dispatch and mark the other agent deleted with no
/// delete ever sent. Now each call is its own entry and acts on its agent.
async fn a_key_reused_on_another_agent_acts_only_on_the_agent_the_call_names(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let a1 = hub.agent(&broker, "a1").await;
    let a2 = hub.agent(&broker, "a2").await;
    let (status, restart) = keyed(
        &hub,
        "POST",
        &format!("/v1/agents/{a1}/restart?wait=false"),
        "K",
        None,
    )
    .await;
    assert_eq!(status, 202, "{restart}");
    let (status, delete) = keyed(
        &hub,
        "DELETE",
        &format!("/v1/agents/{a2}?wait=false"),
        "K",
        None,
    )
    .await;
    assert_eq!(status, 202, "{delete}");
    assert_ne!(delete["dispatch_id"], restart["dispatch_id"]);
    let (_, row) = hub
        .call(
            "GET",
            &format!("/v1/dispatches/{}", delete["dispatch_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        (row["op"].as_str(), row["agent_id"].as_str()),
        (Some("delete"), Some(a2.as_str()))
    );
    // The same key on a message to a1 is a third entry, not the restart.
    let (status, sent) = keyed(
        &hub,
        "POST",
        &format!("/v1/agents/{a1}/messages"),
        "K",
        Some(json!({"body": 1})),
    )
    .await;
    assert_eq!(status, 202, "{sent}");
    let (_, agent) = hub.call("GET", &format!("/v1/agents/{a1}"), None).await;
    assert_ne!(agent["phase"], "deleted");
    hub.shutdown().await;
}

/// A message to one agent with a key already used for another body, or a
/// batch with one such item, is refused whole; batch item keys and single
/// message keys are separate entries.
async fn a_key_reused_for_another_body_is_refused_with_422_and_nothing_is_written(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let a = hub.agent(&broker, "a").await;
    let b = hub.agent(&broker, "b").await;
    let to_a = format!("/v1/agents/{a}/messages");
    let (status, first) = keyed(&hub, "POST", &to_a, "K", Some(json!({"body": {"n": 1}}))).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = keyed(&hub, "POST", &to_a, "K", Some(json!({"body": {"n": 1}}))).await;
    assert_eq!(
        (status, &again["id"]),
        (202, &first["id"]),
        "the same request: the same message"
    );
    let (status, refused) = keyed(&hub, "POST", &to_a, "K", Some(json!({"body": {"n": 2}}))).await;
    assert_eq!(
        (status, code(&refused)),
        (422, "idempotency_key_reused"),
        "{refused}"
    );
    // Another agent: another entry, B's body is kept.
    let (status, to_b) = keyed(
        &hub,
        "POST",
        &format!("/v1/agents/{b}/messages"),
        "K",
        Some(json!({"body": "B"})),
    )
    .await;
    assert_eq!(status, 202, "{to_b}");
    assert_ne!(to_b["id"], first["id"]);
    let (_, row) = hub
        .call(
            "GET",
            &format!("/v1/messages/{}", to_b["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(row["body"], "B");

    let batch = |second: Value| json!({"messages": [{"agent": a, "body": "x"}, {"agent": a, "body": second}]});
    let (status, created) =
        keyed(&hub, "POST", "/v1/messages", "B1", Some(batch(json!("y")))).await;
    assert_eq!(status, 202, "{created}");
    let (status, refused) =
        keyed(&hub, "POST", "/v1/messages", "B1", Some(batch(json!("z")))).await;
    assert_eq!(
        (status, code(&refused)),
        (422, "idempotency_key_reused"),
        "{refused}"
    );
    // A single message keyed like a batch item is not that item.
    let (status, single) = keyed(&hub, "POST", &to_a, "B1/0", Some(json!({"body": "x"}))).await;
    assert_eq!(status, 202, "{single}");
    assert_ne!(single["id"], created["messages"][0]["id"]);
    // a: n=1, x, y, then the single one: the refusals took no place.
    assert_eq!(single["seq"], 4, "{single}");
    hub.shutdown().await;
}

/// A retry of a lifecycle call whose dispatch has finished used to wait its
/// whole window for an event that had already passed.
async fn a_retried_lifecycle_call_whose_dispatch_finished_is_answered_at_once(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let path = format!("/v1/agents/{agent}/start?wait=false");
    let (status, first) = keyed(&hub, "POST", &path, "S", None).await;
    assert_eq!(status, 202, "{first}");
    let dispatch: IntentId = first["dispatch_id"].as_str().unwrap().parse().unwrap();
    hub.store
        .finish_intent(dispatch, IntentOutcome::Done(json!({})))
        .await
        .unwrap();

    let started = Instant::now();
    let (status, body) = keyed(
        &hub,
        "POST",
        &format!("/v1/agents/{agent}/start?timeout_secs=30"),
        "S",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dispatch"]["id"], first["dispatch_id"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    hub.shutdown().await;
}
