//! The `/v1` API's answers to bad input: a clear JSON error, nothing changed.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{TOKEN, TestHub};
use serde_json::{Value, json};
use sqlx::Connection;
use switchyard_proto::auth::Handshake;
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::upgrade;

switchyard_testkit::on_both_backends!(
    requests_without_a_valid_token_get_401,
    malformed_unknown_and_oversized_bodies_are_refused_and_change_nothing,
    unknown_brokers_agents_and_ids_are_404,
    names_and_commands_are_validated,
    deleting_a_broker_with_agents_is_refused,
    idempotency_key_returns_the_same_message,
    lifecycle_without_broker_times_out_with_the_dispatch_id,
    batch_messages_are_all_or_none_and_idempotent,
    concurrent_messages_share_commits_and_a_bad_one_fails_alone,
    a_retried_lifecycle_call_gets_its_original_dispatch,
    a_hundred_parallel_starts_make_one_dispatch,
    timeout_secs_outside_its_range_is_refused_before_anything_is_written,
    payloads_that_no_frame_can_carry_are_refused_with_413_and_nothing_is_written,
    nul_bytes_are_refused_with_422_and_nothing_is_written,
    query_and_path_rejections_are_json_errors,
);

/// A message body or agent definition larger than one control-channel
/// frame can carry would be refused by the broker at every reconnect and
/// block its whole queue: the API refuses it with 413 and writes nothing,
/// while the largest payload that fits is accepted.
async fn payloads_that_no_frame_can_carry_are_refused_with_413_and_nothing_is_written(db: TestDb) {
    use switchyard_proto::MAX_PAYLOAD_BYTES;
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let too_big = "x".repeat(300 * 1024);

    let path = format!("/v1/agents/{agent}/messages");
    let (status, body) = hub
        .call("POST", &path, Some(json!({"body": too_big})))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(error_code(&body), "payload_too_large");
    let batch = json!({"messages": [
        {"agent": agent, "body": "small"},
        {"agent": agent, "body": too_big},
    ]});
    let (status, body) = hub.call("POST", "/v1/messages", Some(batch)).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(error_code(&body), "payload_too_large");
    let largest = "x".repeat(MAX_PAYLOAD_BYTES - 2);
    let (status, body) = hub
        .call("POST", &path, Some(json!({"body": largest})))
        .await;
    assert_eq!(
        status, 202,
        "the largest body that fits is accepted: {body}"
    );
    assert_eq!(
        body["seq"], 1,
        "the refused messages took no place in the FIFO"
    );

    let (status, body) = hub
        .call(
            "POST",
            "/v1/agents",
            Some(json!({
                "name": "bloated", "broker_id": broker,
                "command": ["sleep", "60"], "env": {"BIG": too_big},
            })),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(error_code(&body), "payload_too_large");
    let (status, _) = hub.call("GET", "/v1/agents/bloated", None).await;
    assert_eq!(status, 404, "no agent was created");
    hub.shutdown().await;
}

/// `?timeout_secs=` is 1 to 3600: anything else answers 400 before the
/// agent is looked up or an intent written (a huge value used to overflow
/// the wait's clock arithmetic after the intent was committed).
async fn timeout_secs_outside_its_range_is_refused_before_anything_is_written(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let (_, before) = hub.call("GET", "/v1/dispatches", None).await;
    for value in ["18446744073709551615", "0", "3601"] {
        let (status, body) = hub
            .call(
                "POST",
                &format!("/v1/agents/{agent}/start?timeout_secs={value}"),
                None,
            )
            .await;
        assert_eq!(status, 400, "timeout_secs={value}: {body}");
        assert_eq!(
            error_code(&body),
            "bad_request",
            "timeout_secs={value}: {body}"
        );
    }
    let (_, after) = hub.call("GET", "/v1/dispatches", None).await;
    assert_eq!(
        after, before,
        "no intent was written (only the agent's create)"
    );
    let (_, shown) = hub.call("GET", &format!("/v1/agents/{agent}"), None).await;
    assert_eq!(shown["phase"], "created");
    hub.shutdown().await;
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

async fn requests_without_a_valid_token_get_401(db: TestDb) {
    let hub = TestHub::start(db).await;
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let mut req = hub.http.get(hub.url("/v1/brokers"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(error_code(&body), "unauthorized");
    }
    let resp = hub
        .http
        .post(hub.url("/v1/brokers"))
        .header("authorization", format!("Basic {TOKEN}"))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let (_, brokers) = hub.call("GET", "/v1/brokers", None).await;
    assert_eq!(brokers, json!([]), "nothing was created");
    // Health and metrics need no token.
    assert_eq!(
        hub.http
            .get(hub.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        hub.http
            .get(hub.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    hub.shutdown().await;
}

async fn malformed_unknown_and_oversized_bodies_are_refused_and_change_nothing(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let raw = |path: &str, body: String| {
        hub.http
            .post(hub.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = raw("/v1/brokers", "{\"name\": ".into()).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(error_code(&body), "bad_request");

    let resp = raw(
        "/v1/brokers",
        json!({"name": "b2", "admin": true}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 422);

    let messages = format!("/v1/agents/{agent}/messages");
    let resp = raw(&messages, json!({"body": "x", "priority": 1}).to_string())
        .await
        .unwrap();
    assert_eq!(resp.status(), 422, "unknown field in a message");
    let big = json!({ "body": "x".repeat(600 * 1024) }).to_string();
    let resp = raw(&messages, big).await.unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(error_code(&body), "payload_too_large");

    let (_, brokers) = hub.call("GET", "/v1/brokers", None).await;
    assert_eq!(brokers.as_array().unwrap().len(), 1);
    let (_, dispatches) = hub.call("GET", "/v1/dispatches?state=pending", None).await;
    assert_eq!(
        dispatches.as_array().unwrap().len(),
        1,
        "only the create dispatch"
    );
    let (status, _) = hub.call("GET", "/v1/dispatches?state=bogus", None).await;
    assert_eq!(status, 400);
    hub.shutdown().await;
}

async fn unknown_brokers_agents_and_ids_are_404(db: TestDb) {
    let hub = TestHub::start(db).await;
    let ghost = uuid::Uuid::new_v4();
    for (method, path) in [
        ("GET", format!("/v1/brokers/{ghost}")),
        ("GET", "/v1/brokers/nobody".to_owned()),
        ("DELETE", format!("/v1/brokers/{ghost}")),
        ("GET", format!("/v1/agents/{ghost}")),
        ("POST", format!("/v1/agents/{ghost}/start")),
        ("POST", "/v1/agents/nobody/stop".to_owned()),
        ("DELETE", format!("/v1/agents/{ghost}")),
        ("GET", format!("/v1/messages/{ghost}")),
        ("GET", format!("/v1/dispatches/{ghost}")),
        ("GET", "/v1/no-such-endpoint".to_owned()),
    ] {
        let (status, body) = hub.call(method, &path, None).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert_eq!(error_code(&body), "not_found");
    }
    let (status, _) = hub
        .call(
            "POST",
            &format!("/v1/agents/{ghost}/messages"),
            Some(json!({"body": 1})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = hub
        .call(
            "POST",
            "/v1/agents",
            Some(json!({"name": "a", "broker_id": ghost, "command": ["true"]})),
        )
        .await;
    assert_eq!(status, 404, "agent on an unknown broker");
    let (_, agents) = hub.call("GET", "/v1/agents", None).await;
    assert_eq!(agents, json!([]));
    let (status, body) = hub.call("PATCH", "/v1/brokers", None).await;
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));
    hub.shutdown().await;
}

async fn names_and_commands_are_validated(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    for name in [
        "",
        "has space",
        &"x".repeat(65),
        &uuid::Uuid::new_v4().to_string(),
    ] {
        let (status, _) = hub
            .call("POST", "/v1/brokers", Some(json!({ "name": name })))
            .await;
        assert_eq!(status, 422, "broker name {name:?}");
    }
    let (status, body) = hub
        .call("POST", "/v1/brokers", Some(json!({"name": "edge"})))
        .await;
    assert_eq!((status, error_code(&body)), (409, "conflict"));
    for command in [json!([]), json!([""])] {
        let (status, _) = hub
            .call(
                "POST",
                "/v1/agents",
                Some(json!({"name": "a", "broker_id": broker, "command": command})),
            )
            .await;
        assert_eq!(status, 422);
    }
    let (status, _) = hub
        .call(
            "POST",
            "/v1/agents",
            Some(
                json!({"name": "a", "broker_id": broker, "command": ["true"], "env": {"A=B": "c"}}),
            ),
        )
        .await;
    assert_eq!(status, 422);
    let (_, agents) = hub.call("GET", "/v1/agents", None).await;
    assert_eq!(agents, json!([]));
    hub.shutdown().await;
}

async fn deleting_a_broker_with_agents_is_refused(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    hub.agent(&broker, "worker").await;
    let (status, body) = hub
        .call("DELETE", &format!("/v1/brokers/{broker}"), None)
        .await;
    assert_eq!((status, error_code(&body)), (409, "conflict"));
    let (status, _) = hub.call("GET", "/v1/brokers/edge", None).await;
    assert_eq!(status, 200);
    let (empty, _) = hub.broker("empty").await;
    let (status, _) = hub
        .call("DELETE", &format!("/v1/brokers/{empty}"), None)
        .await;
    assert_eq!(status, 204);
    hub.shutdown().await;
}

async fn idempotency_key_returns_the_same_message(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let send = || {
        hub.http
            .post(hub.url(&format!("/v1/agents/{agent}/messages")))
            .bearer_auth(TOKEN)
            .header("idempotency-key", "order-42")
            .json(&json!({"body": "once"}))
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let second: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["seq"], 1);
    hub.shutdown().await;
}

async fn lifecycle_without_broker_times_out_with_the_dispatch_id(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let started = std::time::Instant::now();
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/start?timeout_secs=1"),
            None,
        )
        .await;
    assert_eq!((status, error_code(&body)), (504, "timeout"), "{body}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let dispatch = body["error"]["dispatch_id"].as_str().unwrap();
    let (_, row) = hub
        .call("GET", &format!("/v1/dispatches/{dispatch}"), None)
        .await;
    assert_eq!(row["state"], "pending", "queued until the broker connects");
    assert_eq!(row["op"], "start");
    hub.shutdown().await;
}

async fn batch_messages_are_all_or_none_and_idempotent(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let first = hub.agent(&broker, "first").await;
    hub.agent(&broker, "second").await;
    let batch = json!({"messages": [
        {"agent": first, "body": 1},
        {"agent": "second", "body": 2},
        {"agent": "first", "body": 3},
    ]});
    let send = |body: Value, key: Option<&str>| {
        let mut req = hub
            .http
            .post(hub.url("/v1/messages"))
            .bearer_auth(TOKEN)
            .json(&body);
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.send()
    };
    let resp = send(batch.clone(), Some("batch-1")).await.unwrap();
    assert_eq!(resp.status(), 202);
    let created: Value = resp.json().await.unwrap();
    let rows = created["messages"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[0]["seq"].as_i64(), rows[2]["seq"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(rows[1]["seq"], 1);
    // The same batch again, with its key: the same rows, nothing new.
    let again: Value = send(batch, Some("batch-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids = |v: &Value| -> Vec<Value> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].clone())
            .collect()
    };
    assert_eq!(ids(&again), ids(&created));
    assert_eq!(
        again["messages"][0]["route"],
        Value::Null,
        "nothing new to route"
    );

    // One unknown agent: 404 and nothing of the batch is written.
    let bad = json!({"messages": [{"agent": "first", "body": 4}, {"agent": "ghost", "body": 5}]});
    assert_eq!(send(bad, None).await.unwrap().status(), 404);
    let ok = json!({"messages": [{"agent": "first", "body": 6}]});
    let next: Value = send(ok, None).await.unwrap().json().await.unwrap();
    assert_eq!(
        next["messages"][0]["seq"], 3,
        "the failed batch wrote nothing"
    );

    assert_eq!(
        send(json!({"messages": []}), None).await.unwrap().status(),
        422
    );
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"agent": "first", "body": i}))
        .collect();
    let resp = send(json!({ "messages": too_many }), None).await.unwrap();
    assert_eq!(resp.status(), 422);
    hub.shutdown().await;
}

async fn concurrent_messages_share_commits_and_a_bad_one_fails_alone(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "busy").await;
    let doomed = hub.agent(&broker, "doomed").await;
    hub.store
        .mark_agent_deleted(doomed.parse().unwrap())
        .await
        .unwrap();
    let mut calls = Vec::new();
    for i in 0..200 {
        let target = if i % 50 == 7 {
            doomed.clone()
        } else {
            agent.clone()
        };
        let http = hub.http.clone();
        let url = hub.url(&format!("/v1/agents/{target}/messages"));
        calls.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(TOKEN)
                .json(&json!({ "body": i }))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (i, status, resp.json::<Value>().await.unwrap())
        }));
    }
    let mut seqs = Vec::new();
    for call in calls {
        let (i, status, body) = call.await.unwrap();
        if i % 50 == 7 {
            assert_eq!(status, 404, "the deleted agent's message fails: {body}");
        } else {
            assert_eq!(status, 202, "{body}");
            seqs.push(body["seq"].as_i64().unwrap());
        }
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=196).collect::<Vec<i64>>(),
        "each accepted once, no gaps"
    );
    hub.shutdown().await;
}

async fn a_retried_lifecycle_call_gets_its_original_dispatch(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let start = || {
        hub.http
            .post(hub.url(&format!("/v1/agents/{agent}/start?wait=false")))
            .bearer_auth(TOKEN)
            .header("idempotency-key", "start-42")
            .send()
    };
    let first: Value = start().await.unwrap().json().await.unwrap();
    // The agent moves on (as if the broker had started it)...
    hub.store
        .apply_agent_status(
            broker.parse().unwrap(),
            agent.parse().unwrap(),
            switchyard_store::StatusReport::phase(switchyard_store::Phase::Running, 1),
        )
        .await
        .unwrap();
    // ...yet the retry is answered from the original dispatch, not with 409.
    let resp = start().await.unwrap();
    assert_eq!(resp.status(), 202);
    let again: Value = resp.json().await.unwrap();
    assert_eq!(again["dispatch_id"], first["dispatch_id"]);
    // Without the key, starting a running agent is refused.
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/start?wait=false"),
            None,
        )
        .await;
    assert_eq!((status, error_code(&body)), (409, "invalid_phase"));
    hub.shutdown().await;
}

/// The phase check and the insert are one step: parallel starts of a
/// stopped agent join one dispatch instead of writing one each.
async fn a_hundred_parallel_starts_make_one_dispatch(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let path = format!("/v1/agents/{agent}/start?wait=false");
    let calls = (0..100).map(|_| hub.call("POST", &path, None));
    let answers = futures::future::join_all(calls).await;
    for (status, body) in &answers {
        assert_eq!(*status, 202, "{body}");
        assert_eq!(body["dispatch_id"], answers[0].1["dispatch_id"]);
    }
    let (_, list) = hub
        .call("GET", &format!("/v1/dispatches?broker_id={broker}"), None)
        .await;
    let starts = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["op"] == "start");
    assert_eq!(starts.count(), 1, "{list}");
    hub.shutdown().await;
}

/// PostgreSQL refuses U+0000 in TEXT and JSONB, and no program can take it
/// in an argument or the environment: every string of a request is checked
/// before anything is written, the same way on both backends.
async fn nul_bytes_are_refused_with_422_and_nothing_is_written(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    let agent = hub.agent(&broker, "worker").await;
    let messages = format!("/v1/agents/{agent}/messages");
    let define = |name: &str, command: Value, env: Value| json!({ "name": name, "broker_id": broker, "command": command, "env": env });
    let refused = [
        ("POST", "/v1/brokers".to_owned(), json!({"name": "b\u{0}"})),
        (
            "POST",
            "/v1/agents".to_owned(),
            define("a\u{0}", json!(["true"]), json!({})),
        ),
        (
            "POST",
            "/v1/agents".to_owned(),
            define("a", json!(["sleep", "6\u{0}0"]), json!({})),
        ),
        (
            "POST",
            "/v1/agents".to_owned(),
            define("a", json!(["true"]), json!({"K\u{0}": "v"})),
        ),
        (
            "POST",
            "/v1/agents".to_owned(),
            define("a", json!(["true"]), json!({"K": "v\u{0}"})),
        ),
        ("POST", messages.clone(), json!({"body": "\u{0}"})),
        (
            "POST",
            messages.clone(),
            json!({"body": {"deep": [1, {"x": "a\u{0}b"}]}}),
        ),
        ("POST", messages.clone(), json!({"body": {"key\u{0}": 1}})),
        (
            "POST",
            "/v1/messages".to_owned(),
            json!({"messages": [
                {"agent": agent, "body": "fine"},
                {"agent": agent, "body": ["\u{0}"]},
            ]}),
        ),
        (
            "POST",
            "/v1/messages".to_owned(),
            json!({"messages": [{"agent": agent, "body": 1, "idempotency_key": "k\u{0}"}]}),
        ),
    ];
    for (method, path, body) in refused {
        let (status, answer) = hub.call(method, &path, Some(body.clone())).await;
        assert_eq!(
            (status, error_code(&answer)),
            (422, "invalid"),
            "{path} {body}: {answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("NUL byte"), "{message}");
    }
    // In a path or a query: a reference that can name nothing.
    for path in [
        "/v1/agents/wor%00ker".to_owned(),
        "/v1/brokers/ed%00ge".to_owned(),
        "/v1/agents?broker_id=ed%00ge".to_owned(),
        "/v1/dispatches?broker_id=%00".to_owned(),
    ] {
        let (status, answer) = hub.call("GET", &path, None).await;
        assert_eq!(
            (status, error_code(&answer)),
            (422, "invalid"),
            "{path}: {answer}"
        );
    }
    let (status, answer) = hub
        .call(
            "POST",
            "/v1/agents/wor%00ker/messages",
            Some(json!({"body": 1})),
        )
        .await;
    assert_eq!((status, error_code(&answer)), (422, "invalid"), "{answer}");

    let (_, brokers) = hub.call("GET", "/v1/brokers", None).await;
    assert_eq!(brokers.as_array().unwrap().len(), 1, "{brokers}");
    let (_, agents) = hub.call("GET", "/v1/agents", None).await;
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    let (_, dispatches) = hub.call("GET", "/v1/dispatches", None).await;
    assert_eq!(
        dispatches.as_array().unwrap().len(),
        1,
        "only worker's create"
    );
    let (status, sent) = hub
        .call("POST", &messages, Some(json!({"body": "clean"})))
        .await;
    assert_eq!(status, 202, "{sent}");
    assert_eq!(
        sent["seq"], 1,
        "no refused message took a place in the queue"
    );
    hub.shutdown().await;
}

/// axum answers a bad path or query in plain text; the API answers every
/// error with its JSON body.
async fn query_and_path_rejections_are_json_errors(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (broker, _) = hub.broker("edge").await;
    hub.agent(&broker, "worker").await;
    for path in [
        "/v1/dispatches?limit=abc",
        "/v1/dispatches?limit=-1",
        "/v1/agents?include_deleted=maybe",
        "/v1/agents?colour=blue",
        "/v1/events?agent=worker&colour=blue",
        "/v1/agents/%FF%FE",
        "/v1/messages/not-a-uuid",
        "/v1/dispatches/not-a-uuid",
    ] {
        let resp = hub
            .http
            .get(hub.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{path}: not JSON: {e}"));
        assert_eq!(error_code(&body), "bad_request", "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let (status, body) = hub
        .call("POST", "/v1/agents/worker/start?wait=perhaps", None)
        .await;
    assert_eq!((status, error_code(&body)), (400, "bad_request"), "{body}");
    let (_, dispatches) = hub.call("GET", "/v1/dispatches", None).await;
    assert_eq!(
        dispatches.as_array().unwrap().len(),
        1,
        "the refused start wrote nothing"
    );
    // The control channel without a WebSocket upgrade.
    let resp = hub
        .http
        .get(hub.url("/v1/brokers/connect"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(error_code(&body), "bad_request", "{body}");
    hub.shutdown().await;
}

/// A connection PostgreSQL drops under a request (here the backend kills
/// itself in a trigger, as `pg_terminate_backend` from an operator would:
/// SQLSTATE 57P01) answers 503 `unavailable`, a retryable outcome, on the
/// API and on the broker handshake alike; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_database_connection_answers_503() {
    let hub = TestHub::start(TestDb::postgres().await).await;
    let (broker, secret) = hub.broker("edge").await;
    let mut conn = sqlx::PgConnection::connect(hub.db.url()).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION drop_my_connection() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$;
         CREATE TRIGGER dropped BEFORE INSERT ON brokers
             FOR EACH ROW EXECUTE FUNCTION drop_my_connection();
         CREATE TRIGGER dropped BEFORE INSERT ON broker_nonces
             FOR EACH ROW EXECUTE FUNCTION drop_my_connection();",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    let (status, body) = hub
        .call("POST", "/v1/brokers", Some(json!({"name": "late"})))
        .await;
    assert_eq!((status, error_code(&body)), (503, "unavailable"), "{body}");
    // The handshake records its nonce in the database.
    assert_eq!(
        upgrade(&hub.base, &Handshake::new(&broker, &secret))
            .await
            .err(),
        Some(503)
    );

    let (status, brokers) = hub.call("GET", "/v1/brokers", None).await;
    assert_eq!(status, 200, "the pool replaced the dropped connections");
    assert_eq!(brokers.as_array().unwrap().len(), 1, "{brokers}");
    conn.close().await.unwrap();
    hub.shutdown().await;
}
