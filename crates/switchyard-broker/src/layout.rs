//! Where the broker keeps things on disk. The SDK and the reference
//! runtime share this layout, so both must be given the same workdir.
//!
//! ```text
//! <workdir>/agents/<agent-id>/
//!     inbox.jsonl       every message handed to the agent, one {"id","body"} line each
//!     dispatches.jsonl  outcomes of executed dispatches (dedup across restarts)
//!     spec.json         the agent's command and env (reference runtime)
//!     state.json        the agent's last settled phase (reference runtime)
//!     deleted           marker: the agent was deleted (reference runtime)
//!     stdout.log, stderr.log
//! ```

use std::path::{Path, PathBuf};

use uuid::Uuid;

pub(crate) const INBOX: &str = "inbox.jsonl";
pub(crate) const DISPATCHES: &str = "dispatches.jsonl";
pub(crate) const SPEC: &str = "spec.json";
pub(crate) const STATE: &str = "state.json";
pub(crate) const DELETED: &str = "deleted";
pub(crate) const STDOUT: &str = "stdout.log";
pub(crate) const STDERR: &str = "stderr.log";

/// Directory holding every agent's directory.
pub(crate) fn agents_dir(workdir: &Path) -> PathBuf {
    workdir.join("agents")
}

/// `<workdir>/broker/`: what the broker keeps for itself (the dispatch log
/// of broker calls).
pub(crate) fn broker_dir(workdir: &Path) -> PathBuf {
    workdir.join("broker")
}

/// `<workdir>/agents/<agent-id>/`.
pub fn agent_dir(workdir: &Path, agent_id: Uuid) -> PathBuf {
    agents_dir(workdir).join(agent_id.to_string())
}
