//! Named operations of the reference runtime, end to end: `switchyard
//! serve` and `switchyard broker` as real processes, agents as real `sh`
//! processes. On PostgreSQL the call goes to replica A while the broker's
//! session is on replica B; on SQLite one replica does both.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_testkit::TestDb;
use switchyard_tests::{Api, Setup, TOKEN, wait_inbox};

switchyard_testkit::on_both_backends!(every_operation_of_the_process_runtime_answers);

async fn every_operation_of_the_process_runtime_answers(db: TestDb) {
    // SQLite serves one replica: the broker is on A too.
    let setup = Setup::new(&db, db.url().starts_with("postgres")).await;
    let _broker = setup.start_broker(&[&setup.owner().base]).await;
    let (api, broker_id, workdir) = (&setup.api, &setup.broker_id, &setup.workdir);
    let agent = api.echo_agent(broker_id, "ops").await;
    api.lifecycle("start", &agent).await;
    for i in 0..3 {
        api.send(&agent, json!(i)).await;
    }
    wait_inbox(workdir, &agent, 3, Duration::from_secs(20)).await;
    exercise(api, &agent, workdir).await;

    // Operations of the broker's runtime itself.
    let (status, body) = api
        .call(
            "POST",
            &format!("/v1/brokers/{broker_id}/ops/agents.list"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let listed = body["result"]["agents"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["agent_id"], agent.as_str());
    assert_eq!(listed[0]["phase"], "running");
    let (status, body) = api
        .call("POST", "/v1/brokers/edge/ops/runtime.info", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["running"], 1, "{body}");
    assert_eq!(body["agent_id"], Value::Null, "a broker call has no agent");
    let (status, body) = api
        .call("POST", &format!("/v1/brokers/{broker_id}/ops/nope"), None)
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_operation");
}

async fn call(api: &Api, agent: &str, name: &str, args: Value) -> (u16, Value) {
    api.call(
        "POST",
        &format!("/v1/agents/{agent}/ops/{name}"),
        Some(json!({ "args": args })),
    )
    .await
}

/// The result of a call that must succeed.
async fn result(api: &Api, agent: &str, name: &str, args: Value) -> Value {
    let (status, body) = call(api, agent, name, args).await;
    assert_eq!(status, 200, "{name}: {body}");
    assert_eq!(body["state"], "done", "{body}");
    body["result"].clone()
}

async fn exercise(api: &Api, agent: &str, workdir: &Path) {
    let inspect = result(api, agent, "inspect", json!({})).await;
    assert_eq!(inspect["phase"], "running", "{inspect}");
    assert!(inspect["pid"].as_u64().unwrap() > 0, "{inspect}");
    assert!(inspect["uptime_secs"].as_f64().unwrap() >= 0.0, "{inspect}");
    assert_eq!(inspect["inbox_count"], 3, "{inspect}");

    // exec: output, exit code, the agent's directory and environment.
    let ran = result(
        api,
        agent,
        "exec",
        json!({ "argv": ["sh", "-c", "echo out; echo err >&2; pwd; \
                echo \"[$SWITCHYARD_BROKER_SECRET][$SWITCHYARD_AGENT_NAME]\"; exit 3"] }),
    )
    .await;
    assert_eq!(ran["exit_code"], 3, "{ran}");
    assert_eq!(ran["timed_out"], false);
    let dir = switchyard_broker::agent_dir(workdir, agent.parse().unwrap());
    let dir = std::fs::canonicalize(dir).unwrap();
    assert_eq!(
        ran["stdout"],
        format!("out\n{}\n[][ops]\n", dir.display()),
        "runs in the agent's directory, without the broker's secret"
    );
    assert_eq!(ran["stderr"], "err\n");

    // exec past its own timeout: killed, and said so.
    let at = Instant::now();
    let slow = result(
        api,
        agent,
        "exec",
        json!({ "argv": ["sh", "-c", "echo started; sleep 30"], "timeout_secs": 1 }),
    )
    .await;
    assert_eq!(slow["timed_out"], true, "{slow}");
    assert_eq!(slow["stdout"], "started\n");
    assert!(at.elapsed() < Duration::from_secs(10), "{:?}", at.elapsed());

    // exec output is capped.
    let loud = result(
        api,
        agent,
        "exec",
        json!({ "argv": ["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"] }),
    )
    .await;
    assert_eq!(loud["stdout"].as_str().unwrap().len(), 64 * 1024);
    assert_eq!(loud["stdout_truncated"], true);

    // files.list and files.read, confined to the agent's directory.
    let listed = result(api, agent, "files.list", json!({})).await;
    let names: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"inbox.jsonl") && names.contains(&"got.txt"),
        "{listed}"
    );
    let read = result(api, agent, "files.read", json!({ "path": "got.txt" })).await;
    assert_eq!(read["encoding"], "utf8");
    assert_eq!(read["eof"], true);
    let lines: Vec<Value> = read["content"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{read}");
    let part = result(
        api,
        agent,
        "files.read",
        json!({ "path": "got.txt", "offset": 1, "max_bytes": 2 }),
    )
    .await;
    assert_eq!(part["content"].as_str().unwrap().len(), 2);
    assert_eq!(part["eof"], false);
    for escape in ["../../../../etc/passwd", "/etc/passwd"] {
        let (status, body) = call(api, agent, "files.read", json!({ "path": escape })).await;
        assert_eq!(status, 422, "{escape}: {body}");
        assert_eq!(body["error"]["code"], "invalid_args");
    }
    let (status, body) = call(api, agent, "files.read", json!({ "path": "missing.txt" })).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");

    // What the runtime does not have, and arguments it refuses.
    let (status, body) = call(api, agent, "no.such.op", json!({})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_operation");
    let (status, body) = call(api, agent, "exec", json!({ "argv": [] })).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_args");

    // A call that outlasts the caller's window: 504 with the dispatch id,
    // and the result is readable once the runtime answers.
    let (status, body) = api
        .call(
            "POST",
            &format!("/v1/agents/{agent}/ops/exec?timeout_secs=1"),
            Some(json!({ "args": { "argv": ["sh", "-c", "sleep 3; echo late"] } })),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    let id = body["error"]["dispatch_id"].as_str().unwrap();
    let done = api
        .wait_until(
            &format!("/v1/dispatches/{id}"),
            Duration::from_secs(20),
            |d| d["state"] == "done",
        )
        .await;
    assert_eq!(done["result"]["stdout"], "late\n", "{done}");
}

/// Replica B holds the broker's session and has claimed and sent a call
/// made on replica A when B is killed (SIGKILL) while the operation runs.
/// Nothing is lost: the broker reconnects to A, the call is sent again and
/// answered from the broker's record of it (it does not run twice), and the
/// caller on A gets the result, or a 504 naming the dispatch, whose result
/// is readable afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_between_a_calls_claim_and_its_result_loses_nothing() {
    let db = TestDb::postgres().await;
    let mut setup = Setup::new(&db, true).await;
    let hubs = [setup.owner().base.clone(), setup.a.base.clone()];
    let _broker = setup.start_broker(&[&hubs[0], &hubs[1]]).await;
    let (api, broker_id, workdir) = (&setup.api, &setup.broker_id, setup.workdir.clone());
    let (a, b) = (&setup.a, setup.b.take().unwrap());
    let agent = api.echo_agent(broker_id, "survivor").await;
    api.lifecycle("start", &agent).await;

    // The operation appends a line each time it runs, so a second run shows.
    let call = {
        let base = a.base.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            Api::new(&base, TOKEN)
                .call(
                    "POST",
                    &format!("/v1/agents/{agent}/ops/exec?timeout_secs=30"),
                    Some(json!({ "args": { "argv": ["sh", "-c", "echo run >> runs.txt; sleep 2; echo finished"] } })),
                )
                .await
        })
    };
    let dir_of_agent = switchyard_broker::agent_dir(&workdir, agent.parse().unwrap());
    let until = Instant::now() + Duration::from_secs(20);
    while !dir_of_agent.join("runs.txt").exists() {
        assert!(Instant::now() < until, "the operation never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.kill9();
    let (status, body) = call.await.unwrap();
    let id = match status {
        200 => body["id"].as_str().unwrap().to_owned(),
        504 => body["error"]["dispatch_id"].as_str().unwrap().to_owned(),
        other => panic!("the caller got {other}: {body}"),
    };
    println!("the caller on A got {status} after B was killed");
    let done = api
        .wait_until(
            &format!("/v1/dispatches/{id}"),
            Duration::from_secs(60),
            |d| d["state"] == "done",
        )
        .await;
    assert_eq!(done["result"]["stdout"], "finished\n", "{done}");
    let runs = std::fs::read_to_string(dir_of_agent.join("runs.txt")).unwrap();
    assert_eq!(runs, "run\n", "the operation ran once");
}

/// Broadcast, cancel and expiry with a real broker process on replica B
/// and every call on replica A: a broadcast to a label while labelled
/// agents are being created reaches each of them once, in order, from the
/// first broadcast that found it on; a start cancelled while the broker
/// was offline never runs; a message whose TTL passed while the broker was
/// offline is never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_cancel_and_expiry_across_replicas_with_a_real_broker() {
    let db = TestDb::postgres().await;
    let setup = Setup::new(&db, true).await;
    let (api, broker_id, workdir) = (&setup.api, &setup.broker_id, &setup.workdir);
    let agent = |name: String, team: &'static str| {
        let api = &api;
        let broker_id = &broker_id;
        async move {
            let (status, body) = api
                .call(
                    "POST",
                    "/v1/agents",
                    Some(json!({ "name": name, "broker_id": broker_id,
                                 "command": ["sh", "-c", switchyard_tests::ECHO_AGENT],
                                 "labels": { "team": team } })),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            body["id"].as_str().unwrap().to_owned()
        }
    };

    // While the broker is offline: a start to cancel, a message to expire.
    let early = agent("early".into(), "red").await;
    let (status, body) = api
        .call(
            "POST",
            &format!("/v1/agents/{early}/start?wait=false"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let start = body["dispatch_id"].as_str().unwrap().to_owned();
    let (status, _) = api
        .call("POST", &format!("/v1/dispatches/{start}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    let (status, short) = api
        .call(
            "POST",
            &format!("/v1/agents/{early}/messages"),
            Some(json!({ "body": "too late", "ttl_secs": 1 })),
        )
        .await;
    assert_eq!(status, 202, "{short}");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let _broker = setup.start_broker(&[&setup.owner().base]).await;

    const N: u64 = 20;
    let (created, answers) = tokio::join!(
        async {
            let mut red = vec![early.clone()];
            for i in 0..12 {
                let team = if i % 3 == 2 { "blue" } else { "red" };
                let id = agent(format!("late-{i}"), team).await;
                if team == "red" {
                    red.push(id);
                }
            }
            red
        },
        async {
            let mut answers = Vec::new();
            for k in 0..N {
                let (status, body) = api
                    .call(
                        "POST",
                        "/v1/messages",
                        Some(json!({ "to": { "labels": { "team": "red" } }, "body": k })),
                    )
                    .await;
                assert_eq!(status, 202, "{body}");
                answers.push(body);
            }
            answers
        },
    );
    let copies: usize = answers
        .iter()
        .map(|a| a["messages"].as_array().unwrap().len())
        .sum();
    // Every red agent's inbox: an unbroken run up to the last broadcast.
    let mut received = 0;
    for id in &created {
        let expected_from = answers
            .iter()
            .position(|a| {
                a["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["agent_id"] == id.as_str())
            })
            .map_or(N, |k| k as u64);
        let n = (N - expected_from) as usize;
        let lines = if n > 0 {
            switchyard_tests::wait_inbox(workdir, id, n, Duration::from_secs(30)).await
        } else {
            Vec::new()
        };
        let got: Vec<u64> = lines.iter().map(|l| l["body"].as_u64().unwrap()).collect();
        assert_eq!(got, (expected_from..N).collect::<Vec<_>>(), "agent {id}");
        received += got.len();
    }
    assert_eq!(received, copies, "no copy went to a blue agent");
    println!(
        "{} red agents, {copies} copies, each once and in order",
        created.len()
    );

    // The cancelled start never ran, the expired message never came.
    let (_, row) = api.call("GET", &format!("/v1/agents/{early}"), None).await;
    assert_eq!(row["phase"], "created", "{row}");
    let inbox = switchyard_tests::inbox(workdir, &early);
    assert!(inbox.iter().all(|l| l["body"] != "too late"), "{inbox:?}");
    let id = short["id"].as_str().unwrap();
    // The sweeper (every 5 s) marks it.
    api.wait_until(
        &format!("/v1/messages/{id}"),
        Duration::from_secs(20),
        |m| m["state"] == "expired",
    )
    .await;
}
