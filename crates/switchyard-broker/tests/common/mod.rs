//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use switchyard_proto::{AgentSpec, Dispatch, Op};
use uuid::Uuid;

/// Polls `check` until it holds, failing the test after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn spec(script: &str) -> AgentSpec {
    AgentSpec {
        name: "test-agent".to_owned(),
        command: vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
        env: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
    }
}

pub fn dispatch(agent_id: Uuid, op: Op, spec: &AgentSpec) -> Dispatch {
    Dispatch {
        id: Uuid::new_v4(),
        agent_id,
        op,
        name: None,
        agent: spec.clone(),
        args: serde_json::Value::Null,
    }
}

/// A call of the named operation with `args`.
pub fn call(agent_id: Uuid, name: &str, args: serde_json::Value, spec: &AgentSpec) -> Dispatch {
    Dispatch {
        name: Some(name.to_owned()),
        args,
        ..dispatch(agent_id, Op::Call, spec)
    }
}

/// The lines of a file (none if it does not exist).
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether a process (or group member) with this pid still exists.
pub fn alive(pid: u32) -> bool {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, None).is_ok()
}

/// Reads `<agent dir>/<file>`.
pub fn agent_file(workdir: &Path, agent_id: Uuid, file: &str) -> std::path::PathBuf {
    switchyard_broker::agent_dir(workdir, agent_id).join(file)
}
