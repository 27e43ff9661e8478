//! Named operations (`POST /v1/agents/{agent}/ops/{name}`) against a
//! broker driven frame by frame over a real WebSocket.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::TestHub;
use serde_json::{Value, json};
use switchyard_proto::{BrokerFrame, DispatchResult, HubFrame, Op, UNKNOWN_OPERATION};
use switchyard_testkit::TestDb;
use switchyard_testkit::broker::RawBroker;

switchyard_testkit::on_both_backends!(
    a_call_is_answered_with_what_the_runtime_returned,
    calls_are_checked_before_anything_is_written,
    a_call_that_outlasts_its_window_answers_504_and_its_result_is_kept,
    cancelled_work_never_reaches_the_broker,
    a_create_that_waits_answers_with_the_brokers_create_result,
    what_a_broker_reports_about_a_call_is_bounded_before_it_is_stored,
    a_broker_call_is_answered_and_waits_for_no_agents_work,
);

/// A broker that answers `create` and every call: `echo` returns its
/// arguments, `fail` fails, anything else is an unknown operation. Calls
/// named `slow` are held until the test says so (the returned sender).
fn answer(d: &switchyard_proto::Dispatch) -> DispatchResult {
    let name = d.name.as_deref().unwrap_or_default();
    let (ok, result, error, code) = match (d.op, name) {
        (Op::Create, _) => (true, Some(json!({})), None, None),
        (Op::Call, "echo" | "slow") => (true, Some(json!({ "echo": d.args })), None, None),
        (Op::Call, "fail") => (false, None, Some("it broke".to_owned()), None),
        _ => (
            false,
            None,
            Some(format!("unknown operation {name:?}")),
            Some(UNKNOWN_OPERATION.to_owned()),
        ),
    };
    DispatchResult {
        dispatch_id: d.id,
        ok,
        result,
        error,
        code,
    }
}

async fn drive(mut broker: RawBroker, hold: tokio::sync::watch::Receiver<bool>) {
    while let Some(frame) = broker.recv().await {
        let HubFrame::Dispatch(d) = frame else {
            continue;
        };
        if d.name.as_deref() == Some("slow") {
            let mut hold = hold.clone();
            let _ = hold.wait_for(|released| *released).await;
        }
        broker.send(&BrokerFrame::Result(answer(&d))).await;
    }
}

async fn setup(hub: &TestHub) -> (String, tokio::sync::watch::Sender<bool>) {
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let broker = RawBroker::connect(&hub.base, &id, &secret).await;
    let (release, hold) = tokio::sync::watch::channel(false);
    tokio::spawn(drive(broker, hold));
    (agent, release)
}

async fn a_call_is_answered_with_what_the_runtime_returned(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (agent, _release) = setup(&hub).await;

    let args = json!({ "path": "prompt.md", "n": [1, 2] });
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/ops/echo"),
            Some(json!({ "args": args })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["op"], "call");
    assert_eq!(body["name"], "echo");
    assert_eq!(body["state"], "done");
    assert_eq!(body["result"], json!({ "echo": args }));

    // No body at all: the arguments are {}.
    let resp = hub
        .http
        .post(hub.url(&format!("/v1/agents/{agent}/ops/echo")))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["result"], json!({ "echo": {} }));

    // Not waiting: 202, then the dispatch carries the result.
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/ops/echo?wait=false"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["dispatch_id"].as_str().unwrap().to_owned();
    let done = hub
        .wait_until(&format!("/v1/dispatches/{id}"), |d| d["state"] == "done")
        .await;
    assert_eq!(done["result"], json!({ "echo": {} }));

    // The runtime's refusals, each with the dispatch id.
    let (status, body) = hub
        .call("POST", &format!("/v1/agents/{agent}/ops/nope"), None)
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_operation");
    assert!(body["error"]["dispatch_id"].is_string());
    let (status, body) = hub
        .call("POST", &format!("/v1/agents/{agent}/ops/fail"), None)
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "broker_failed");
    assert_eq!(body["error"]["message"], "it broke");

    // Two identical calls are two dispatches (only lifecycle ops join).
    let echo = format!("/v1/agents/{agent}/ops/echo");
    let (a, b) = tokio::join!(hub.call("POST", &echo, None), hub.call("POST", &echo, None),);
    assert_eq!((a.0, b.0), (200, 200));
    assert_ne!(a.1["id"], b.1["id"]);

    // An Idempotency-Key replays the call; the same key with other
    // arguments is refused.
    let keyed = |args: Value| {
        hub.http
            .post(hub.url(&format!("/v1/agents/{agent}/ops/echo")))
            .bearer_auth(common::TOKEN)
            .header("Idempotency-Key", "call-1")
            .json(&json!({ "args": args }))
            .send()
    };
    let first: Value = keyed(json!({ "x": 1 }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let again: Value = keyed(json!({ "x": 1 }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["result"], json!({ "echo": { "x": 1 } }));
    assert_eq!(first["id"], again["id"]);
    let other = keyed(json!({ "x": 2 })).await.unwrap();
    assert_eq!(other.status(), 422);
    hub.shutdown().await;
}

async fn calls_are_checked_before_anything_is_written(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (agent, _release) = setup(&hub).await;
    let count = || async {
        let (_, list) = hub.call("GET", "/v1/dispatches", None).await;
        list.as_array().unwrap().len()
    };
    hub.wait_until("/v1/dispatches", |l| l[0]["state"] == "done")
        .await;
    let before = count().await;

    let big = "x".repeat(switchyard_proto::MAX_PAYLOAD_BYTES);
    let long = "a".repeat(65);
    let refused = [
        ("Inspect", json!({}), 422),
        ("a%20b", json!({}), 422),
        (long.as_str(), json!({}), 422),
        ("echo", json!({ "args": [1] }), 422),
        ("echo", json!({ "args": "x" }), 422),
        ("echo", json!({ "argz": {} }), 422),
        ("echo", json!({ "args": { "big": big } }), 413),
    ];
    for (name, body, expected) in refused {
        let (status, answer) = hub
            .call(
                "POST",
                &format!("/v1/agents/{agent}/ops/{name}"),
                Some(body),
            )
            .await;
        assert_eq!(status, expected, "{name}: {answer}");
    }
    let (status, _) = hub.call("POST", "/v1/agents/nobody/ops/echo", None).await;
    assert_eq!(status, 404);
    assert_eq!(count().await, before, "nothing was written");
    hub.shutdown().await;
}

async fn a_call_that_outlasts_its_window_answers_504_and_its_result_is_kept(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (agent, release) = setup(&hub).await;
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/ops/slow?timeout_secs=1"),
            Some(json!({ "args": { "k": "v" } })),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "timeout");
    let id = body["error"]["dispatch_id"].as_str().unwrap().to_owned();
    release.send(true).unwrap();
    let done = hub
        .wait_until(&format!("/v1/dispatches/{id}"), |d| d["state"] == "done")
        .await;
    assert_eq!(done["result"], json!({ "echo": { "k": "v" } }));
    hub.shutdown().await;
}

/// A start and a message queued for an offline broker are cancelled; when
/// the broker connects it gets the agent's create and the message written
/// after them, never the cancelled work. Work already sent cannot be
/// cancelled (409, state named), and cancelling twice answers the same.
async fn cancelled_work_never_reaches_the_broker(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let (status, body) = hub
        .call(
            "POST",
            &format!("/v1/agents/{agent}/start?wait=false"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let start = body["dispatch_id"].as_str().unwrap().to_owned();
    let send = |text: &'static str| {
        let path = format!("/v1/agents/{agent}/messages");
        let hub = &hub;
        async move {
            let (status, body) = hub.call("POST", &path, Some(json!({ "body": text }))).await;
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().to_owned()
        }
    };
    let dropped = send("withdrawn").await;
    let kept = send("kept").await;

    for _ in 0..2 {
        let (status, body) = hub
            .call("POST", &format!("/v1/dispatches/{start}/cancel"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "cancelled");
        let (status, body) = hub
            .call("DELETE", &format!("/v1/messages/{dropped}"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "cancelled");
    }

    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while let Ok(Some(frame)) = tokio::time::timeout_at(until, broker.recv()).await {
        match frame {
            HubFrame::Dispatch(d) => {
                got.push(d.op.to_string());
                broker.done(d.id).await;
            }
            HubFrame::Message(m) => {
                got.push(m.body.to_string());
                broker.ack(m.id).await;
            }
            _ => {}
        }
    }
    assert_eq!(got, ["create", "\"kept\""]);

    // Sent and finished work cannot be withdrawn.
    let (status, body) = hub
        .call("DELETE", &format!("/v1/messages/{kept}"), None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "not_pending");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delivered")
    );
    let (_, list) = hub
        .call("GET", &format!("/v1/dispatches?broker_id={id}"), None)
        .await;
    let create = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["op"] == "create")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = hub
        .call("POST", &format!("/v1/dispatches/{create}/cancel"), None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("done"));
    let (status, _) = hub
        .call(
            "POST",
            &format!("/v1/dispatches/{}/cancel", uuid::Uuid::new_v4()),
            None,
        )
        .await;
    assert_eq!(status, 404);
    hub.shutdown().await;
}

/// `POST /v1/agents?wait=true` carries `args` to the broker's create and
/// answers 201 with the create's result; a create the broker fails is a
/// 502 naming the dispatch, and the agent stays defined.
async fn a_create_that_waits_answers_with_the_brokers_create_result(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    tokio::spawn(async move {
        while let Some(frame) = broker.recv().await {
            let HubFrame::Dispatch(d) = frame else {
                continue;
            };
            let fail = d.args["fail"] == true;
            broker
                .send(&BrokerFrame::Result(DispatchResult {
                    dispatch_id: d.id,
                    ok: !fail,
                    result: (!fail).then(|| json!({ "needs": ["API_KEY"], "got": d.args })),
                    error: fail.then(|| "no room".to_owned()),
                    code: None,
                }))
                .await;
        }
    });
    let create = |name: &str, args: Value| {
        hub.call(
            "POST",
            "/v1/agents?wait=true&timeout_secs=5",
            Some(json!({ "name": name, "broker_id": id, "command": ["true"], "args": args })),
        )
    };
    let (status, body) = create("w1", json!({ "template": "t1" })).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["name"], "w1");
    assert_eq!(body["dispatch"]["op"], "create");
    assert_eq!(body["dispatch"]["args"], json!({ "template": "t1" }));
    assert_eq!(
        body["dispatch"]["result"],
        json!({ "needs": ["API_KEY"], "got": { "template": "t1" } })
    );

    let (status, body) = create("w2", json!({ "fail": true })).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["error"]["dispatch_id"].is_string());
    let (status, _) = hub.call("GET", "/v1/agents/w2", None).await;
    assert_eq!(status, 200, "the agent stays defined");

    let (status, body) = create("w3", json!([1])).await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = hub.call("GET", "/v1/agents/w3", None).await;
    assert_eq!(status, 404, "nothing was written");
    hub.shutdown().await;
}

/// A broker's result can carry anything JSON can: NUL bytes (which
/// PostgreSQL cannot store), an error of any length, a code that is no
/// word. The call is still answered and the row stored, bounded: NUL
/// becomes U+FFFD, the error is cut to 4 KiB, a bad code is dropped.
async fn what_a_broker_reports_about_a_call_is_bounded_before_it_is_stored(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let agent = hub.agent(&id, "worker").await;
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    tokio::spawn(async move {
        while let Some(frame) = broker.recv().await {
            let HubFrame::Dispatch(d) = frame else {
                continue;
            };
            let result = match d.name.as_deref() {
                Some("nul") => DispatchResult {
                    dispatch_id: d.id,
                    ok: true,
                    result: Some(json!({ "a\u{0}b": ["x\u{0}y"] })),
                    error: None,
                    code: None,
                },
                Some("long") => DispatchResult {
                    dispatch_id: d.id,
                    ok: false,
                    result: None,
                    error: Some(format!("{}\u{0}", "e".repeat(10_000))),
                    code: Some("Not A Word!".to_owned()),
                },
                _ => DispatchResult {
                    dispatch_id: d.id,
                    ok: true,
                    result: Some(json!({})),
                    error: None,
                    code: None,
                },
            };
            broker.send(&BrokerFrame::Result(result)).await;
        }
    });
    let (status, body) = hub
        .call("POST", &format!("/v1/agents/{agent}/ops/nul"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], json!({ "a\u{fffd}b": ["x\u{fffd}y"] }));
    let (status, body) = hub
        .call("POST", &format!("/v1/agents/{agent}/ops/long"), None)
        .await;
    assert_eq!(status, 502, "a dropped code is a plain failure: {body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.len() <= 4096 && message.ends_with('…'),
        "{}",
        message.len()
    );
    let id = body["error"]["dispatch_id"].as_str().unwrap();
    let (_, row) = hub.call("GET", &format!("/v1/dispatches/{id}"), None).await;
    assert_eq!(row["error_code"], Value::Null);
    hub.shutdown().await;
}

/// `POST /v1/brokers/{broker}/ops/{name}` goes to the broker's runtime as a
/// `broker_call` frame. Queued while the broker is offline (202), it is
/// sent when the broker connects, and it is not held back by an agent's
/// unanswered dispatch.
async fn a_broker_call_is_answered_and_waits_for_no_agents_work(db: TestDb) {
    let hub = TestHub::start(db).await;
    let (id, secret) = hub.broker("edge").await;
    let _agent = hub.agent(&id, "worker").await;
    let (status, body) = hub
        .call(
            "POST",
            "/v1/brokers/edge/ops/skills.list?wait=false",
            Some(json!({ "args": { "q": 1 } })),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let queued = body["dispatch_id"].as_str().unwrap().to_owned();
    let mut broker = RawBroker::connect(&hub.base, &id, &secret).await;
    // The agent's create is never answered; the broker calls still go.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(frame) = broker.recv().await {
            if let HubFrame::BrokerCall(call) = frame {
                let _ = seen_tx.send(call.name.clone());
                broker
                    .send(&BrokerFrame::Result(DispatchResult {
                        dispatch_id: call.id,
                        ok: true,
                        result: Some(json!({ "name": call.name, "args": call.args })),
                        error: None,
                        code: None,
                    }))
                    .await;
            }
        }
    });
    let done = hub
        .wait_until(&format!("/v1/dispatches/{queued}"), |d| {
            d["state"] == "done"
        })
        .await;
    assert_eq!(
        done["result"],
        json!({ "name": "skills.list", "args": { "q": 1 } })
    );
    assert_eq!(done["agent_id"], Value::Null);
    let (status, body) = hub
        .call("POST", &format!("/v1/brokers/{id}/ops/skills.import"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["name"], "skills.import");
    assert_eq!(seen.recv().await.unwrap(), "skills.list");
    assert_eq!(seen.recv().await.unwrap(), "skills.import");
    let (status, _) = hub.call("POST", "/v1/brokers/nobody/ops/x", None).await;
    assert_eq!(status, 404);
    let (status, _) = hub.call("POST", "/v1/brokers/edge/ops/Bad", None).await;
    assert_eq!(status, 422);
    hub.shutdown().await;
}
