//! The reference runtime against real processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{agent_file, alive, dispatch, eventually, lines, spec};
use serde_json::json;
use switchyard_broker::{ProcessConfig, ProcessRuntime, Runtime, RuntimeError};
use switchyard_proto::{AgentMessage, AgentStatus, Op, Phase};
use tokio::sync::broadcast;
use uuid::Uuid;

const ECHO_LINES: &str =
    r#"echo "$GREETING" > env.txt; while IFS= read -r l; do printf '%s\n' "$l" >> got.txt; done"#;
const LIMIT: Duration = Duration::from_secs(10);

async fn runtime(workdir: &std::path::Path, grace: Duration) -> ProcessRuntime {
    let mut config = ProcessConfig::new(workdir);
    config.stop_grace = grace;
    ProcessRuntime::new(config).await.unwrap()
}

async fn next_status(feed: &mut broadcast::Receiver<AgentStatus>, agent_id: Uuid) -> AgentStatus {
    loop {
        let status = tokio::time::timeout(LIMIT, feed.recv())
            .await
            .expect("a status in time")
            .unwrap();
        if status.agent_id == agent_id {
            return status;
        }
    }
}

async fn phases(
    feed: &mut broadcast::Receiver<AgentStatus>,
    agent_id: Uuid,
    count: usize,
) -> Vec<Phase> {
    let mut seen = Vec::new();
    let mut last_seq = 0;
    for _ in 0..count {
        let status = next_status(feed, agent_id).await;
        assert!(status.seq > last_seq, "seq must increase");
        last_seq = status.seq;
        seen.push(status.phase);
    }
    seen
}

fn message(agent_id: Uuid, seq: i64, body: serde_json::Value) -> AgentMessage {
    AgentMessage {
        id: Uuid::new_v4(),
        agent_id,
        seq,
        body,
        attachments: Vec::new(),
    }
}

#[tokio::test]
async fn start_deliver_stop_reports_every_phase_and_keeps_message_order() {
    let workdir = tempfile::tempdir().unwrap();
    let rt = runtime(workdir.path(), Duration::from_secs(5)).await;
    let mut feed = rt.subscribe();
    let agent_id = Uuid::new_v4();
    let spec = spec(ECHO_LINES);

    let created = rt
        .apply(&dispatch(agent_id, Op::Create, &spec))
        .await
        .unwrap();
    assert_eq!(created, json!({"phase": "created", "pid": null}));
    let started = rt
        .apply(&dispatch(agent_id, Op::Start, &spec))
        .await
        .unwrap();
    assert_eq!(started["phase"], "running");
    let pid = u32::try_from(started["pid"].as_u64().unwrap()).unwrap();
    assert!(alive(pid));
    // Starting a running agent changes nothing.
    let again = rt
        .apply(&dispatch(agent_id, Op::Start, &spec))
        .await
        .unwrap();
    assert_eq!(again, started);

    let messages: Vec<_> = (0..5)
        .map(|n| message(agent_id, n, json!({"n": n, "text": "line\nbreak"})))
        .collect();
    for m in &messages {
        rt.deliver(m).await.unwrap();
    }
    let got = agent_file(workdir.path(), agent_id, "got.txt");
    eventually("all lines on stdin", LIMIT, || async {
        lines(&got).len() == 5
    })
    .await;
    let expected: Vec<_> = messages.iter().map(switchyard_broker::inbox_line).collect();
    assert_eq!(lines(&got), expected);
    assert_eq!(
        lines(&agent_file(workdir.path(), agent_id, "env.txt")),
        vec!["hi"]
    );

    let stopped = rt
        .apply(&dispatch(agent_id, Op::Stop, &spec))
        .await
        .unwrap();
    assert_eq!(stopped, json!({"phase": "stopped", "pid": null}));
    assert!(!alive(pid));
    assert_eq!(
        phases(&mut feed, agent_id, 5).await,
        vec![
            Phase::Created,
            Phase::Starting,
            Phase::Running,
            Phase::Stopping,
            Phase::Stopped
        ]
    );
    assert!(
        matches!(
            rt.deliver(&messages[0]).await,
            Err(RuntimeError::NotRunning)
        ),
        "not running"
    );
    assert_eq!(rt.statuses().len(), 1);
    assert_eq!(rt.statuses()[0].phase, Phase::Stopped);
}

#[tokio::test]
async fn a_process_that_exits_by_itself_is_stopped_or_error_by_exit_code() {
    let workdir = tempfile::tempdir().unwrap();
    let rt = runtime(workdir.path(), Duration::from_secs(5)).await;
    let mut feed = rt.subscribe();

    for (script, phase, code) in [("exit 0", Phase::Stopped, 0), ("exit 3", Phase::Error, 3)] {
        let agent_id = Uuid::new_v4();
        rt.apply(&dispatch(agent_id, Op::Start, &spec(script)))
            .await
            .unwrap();
        let status = loop {
            let status = next_status(&mut feed, agent_id).await;
            if status.phase != Phase::Created
                && status.phase != Phase::Starting
                && status.phase != Phase::Running
            {
                break status;
            }
        };
        assert_eq!(status.phase, phase, "{script}");
        assert_eq!(status.exit_code, Some(code), "{script}");
    }
}

#[tokio::test]
async fn a_process_ignoring_sigterm_is_killed_after_the_grace_period() {
    let workdir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(300);
    let rt = runtime(workdir.path(), grace).await;
    let agent_id = Uuid::new_v4();
    let spec = spec(r#"trap "" TERM; echo ready > ready.txt; sleep 60"#);
    let started = rt
        .apply(&dispatch(agent_id, Op::Start, &spec))
        .await
        .unwrap();
    let pid = u32::try_from(started["pid"].as_u64().unwrap()).unwrap();
    let ready = agent_file(workdir.path(), agent_id, "ready.txt");
    eventually("the trap is set", LIMIT, || async { ready.exists() }).await;

    let begun = Instant::now();
    let stopped = rt
        .apply(&dispatch(agent_id, Op::Stop, &spec))
        .await
        .unwrap();
    let took = begun.elapsed();
    assert_eq!(stopped["phase"], "stopped");
    assert!(
        took >= grace,
        "SIGKILL came before the grace ended: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "stop took {took:?}");
    assert!(!alive(pid));
    // The whole group went, `sleep` included.
    let group = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    eventually("the process group is gone", LIMIT, || async {
        nix::sys::signal::killpg(group, None).is_err()
    })
    .await;
}

#[tokio::test]
async fn restart_and_delete_follow_the_lifecycle_and_deleted_agents_refuse_ops() {
    let workdir = tempfile::tempdir().unwrap();
    let rt = runtime(workdir.path(), Duration::from_secs(5)).await;
    let agent_id = Uuid::new_v4();
    let spec = spec(r#"echo x >> starts.txt; exec cat > /dev/null"#);
    let first = rt
        .apply(&dispatch(agent_id, Op::Start, &spec))
        .await
        .unwrap();
    let starts = agent_file(workdir.path(), agent_id, "starts.txt");
    // A restart may stop the first process before its shell ran `echo`
    // (seen on a loaded machine): let it write its line first.
    eventually("the first start", LIMIT, || async {
        lines(&starts).len() == 1
    })
    .await;
    let second = rt
        .apply(&dispatch(agent_id, Op::Restart, &spec))
        .await
        .unwrap();
    assert_eq!(second["phase"], "running");
    assert_ne!(first["pid"], second["pid"]);
    eventually("two starts", LIMIT, || async { lines(&starts).len() == 2 }).await;

    let deleted = rt
        .apply(&dispatch(agent_id, Op::Delete, &spec))
        .await
        .unwrap();
    assert_eq!(deleted, json!({"phase": "deleted", "pid": null}));
    let pid = u32::try_from(second["pid"].as_u64().unwrap()).unwrap();
    assert!(!alive(pid));
    assert!(agent_file(workdir.path(), agent_id, "deleted").exists());
    assert!(rt.statuses().is_empty(), "deleted agents are not in hello");
    let refused = rt
        .apply(&dispatch(agent_id, Op::Start, &spec))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("deleted"));
    assert!(matches!(refused, RuntimeError::Deleted(id) if id == agent_id));
    // Deleting twice is fine.
    rt.apply(&dispatch(agent_id, Op::Delete, &spec))
        .await
        .unwrap();

    // A new runtime on the same workdir still knows it is deleted.
    let rt = runtime(workdir.path(), Duration::from_secs(5)).await;
    assert!(
        rt.apply(&dispatch(agent_id, Op::Start, &spec))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_command_that_cannot_start_is_an_error() {
    let workdir = tempfile::tempdir().unwrap();
    let rt = runtime(workdir.path(), Duration::from_secs(5)).await;
    let agent_id = Uuid::new_v4();
    let mut bad = spec("");
    bad.command = vec!["/nonexistent/switchyard-agent".to_owned()];
    let err = rt
        .apply(&dispatch(agent_id, Op::Start, &bad))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot start"), "{err}");
    assert!(matches!(err, RuntimeError::Spawn { .. }), "{err:?}");
    assert_eq!(rt.statuses()[0].phase, Phase::Error);
    bad.command.clear();
    let empty = rt
        .apply(&dispatch(agent_id, Op::Start, &bad))
        .await
        .unwrap_err();
    assert!(matches!(empty, RuntimeError::EmptyCommand), "{empty:?}");
}

#[tokio::test]
async fn a_new_runtime_restarts_agents_that_were_running() {
    let workdir = tempfile::tempdir().unwrap();
    let grace = Duration::from_secs(5);
    let old = runtime(workdir.path(), grace).await;
    let running = Uuid::new_v4();
    let stopped = Uuid::new_v4();
    let spec = spec(r#"echo x >> starts.txt; exec cat > /dev/null"#);
    let first = old
        .apply(&dispatch(running, Op::Start, &spec))
        .await
        .unwrap();
    old.apply(&dispatch(stopped, Op::Create, &spec))
        .await
        .unwrap();
    old.shutdown().await;
    let pid = u32::try_from(first["pid"].as_u64().unwrap()).unwrap();
    assert!(!alive(pid), "shutdown leaves no process behind");

    let new = runtime(workdir.path(), grace).await;
    let mut statuses = new.statuses();
    statuses.sort_by_key(|s| s.agent_id == stopped);
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0].phase, Phase::Running);
    assert_eq!(statuses[1].phase, Phase::Created);
    let starts = agent_file(workdir.path(), running, "starts.txt");
    eventually("the agent ran again", LIMIT, || async {
        lines(&starts).len() == 2
    })
    .await;
    new.shutdown().await;
}
