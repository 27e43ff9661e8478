//! What a broker runs agents with: the [`Runtime`] trait the SDK drives.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use switchyard_proto::{AgentMessage, AgentStatus, Dispatch};
use tokio::sync::broadcast;

/// Runs agents. The SDK ([`crate::run`]) owns the control channel, dedup and
/// the inbox; a runtime only performs operations and reports phases.
///
/// The SDK calls `apply` and `deliver` for one agent strictly one at a
/// time, in the order the hub sent them; calls for different agents may
/// run concurrently.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Performs a lifecycle op (create, start, stop, restart, delete) and
    /// returns details for the hub (e.g. `{"phase": .., "pid": ..}`). An
    /// `Err` is reported as a failed dispatch with that text. Called at
    /// most once per dispatch id (the SDK remembers outcomes).
    async fn apply(&self, dispatch: &Dispatch) -> Result<Value, String>;

    /// Hands a message to the running agent. Called once per message id,
    /// after the SDK has durably appended it to the agent's `inbox.jsonl`;
    /// the message is acknowledged whatever this returns (the inbox is the
    /// durable record), an `Err` is only logged.
    async fn deliver(&self, message: &AgentMessage) -> Result<(), String>;

    /// The current status of every agent the runtime knows (deleted ones
    /// excepted), sent in the `hello` of every session.
    fn statuses(&self) -> Vec<AgentStatus>;

    /// A feed of status changes, forwarded to the hub while a session is
    /// live. A session subscribes before it reads [`Runtime::statuses`], so
    /// no change falls between the two; changes while disconnected are
    /// covered by the next `hello`.
    fn subscribe(&self) -> broadcast::Receiver<AgentStatus>;
}

static LAST_SEQ: AtomicI64 = AtomicI64::new(0);

/// The next status sequence number: `max(last + 1, now in unix µs)`.
/// Increases within the process and, because it follows the clock, across
/// broker restarts too (as long as the clock does not jump back).
pub fn next_seq() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let mut last = LAST_SEQ.load(Ordering::Relaxed);
    loop {
        let next = now.max(last.saturating_add(1));
        match LAST_SEQ.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => last = actual,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_increases_and_follows_the_clock() {
        let a = next_seq();
        let b = next_seq();
        assert!(b > a);
        assert!(a > 1_700_000_000_000_000);
    }
}
