//! What a broker runs agents with: the [`Runtime`] trait the SDK drives.

use std::fmt::Display;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use switchyard_proto::{AgentMessage, AgentStatus, BrokerCall, Dispatch};
use tokio::sync::broadcast;
use uuid::Uuid;

/// Why a runtime could not apply a dispatch or deliver a message.
///
/// The `Display` text is what the hub receives as a failed dispatch's
/// reason (`DispatchResult::error`) and what operators read in the broker's
/// log, so it is written for them. The named variants are the cases of
/// [`crate::ProcessRuntime`]; other runtimes use [`RuntimeError::other`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The runtime has no record of the agent.
    #[error("unknown agent")]
    UnknownAgent,
    /// The agent was deleted; a deleted agent refuses every op but `delete`.
    #[error("agent {0} is deleted")]
    Deleted(Uuid),
    /// The agent's spec has no program to run.
    #[error("the agent's command is empty")]
    EmptyCommand,
    /// The agent's program could not be started.
    #[error("cannot start {program:?}: {source}")]
    Spawn { program: String, source: io::Error },
    /// The agent's directory could not be created.
    #[error("cannot create {}: {source}", path.display())]
    AgentDir { path: PathBuf, source: io::Error },
    /// The agent's spec could not be encoded for `spec.json`.
    #[error("{0}")]
    EncodeSpec(#[source] serde_json::Error),
    /// `spec.json` could not be written.
    #[error("cannot write the agent's spec: {0}")]
    WriteSpec(#[source] io::Error),
    /// The `deleted` marker could not be written.
    #[error("cannot mark the agent deleted: {0}")]
    MarkDeleted(#[source] io::Error),
    /// A message came for an agent that has no running process.
    #[error("the agent is not running")]
    NotRunning,
    /// The agent's process no longer reads its stdin.
    #[error("the agent's stdin is closed")]
    StdinClosed,
    /// A call named an operation the runtime does not have.
    #[error("unknown operation {0:?}")]
    UnknownOperation(String),
    /// A call's arguments do not suit its operation.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// A call named a file or directory that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Any other failure, with the text the hub should see.
    #[error("{0}")]
    Other(String),
}

impl RuntimeError {
    /// A failure of a runtime other than [`crate::ProcessRuntime`]: its
    /// text becomes the reason the hub reports.
    ///
    /// ```
    /// use switchyard_broker::RuntimeError;
    ///
    /// // A container engine's error, passed on with its own text.
    /// let engine = std::io::Error::other("no such container: c-42");
    /// let err = RuntimeError::other(engine);
    /// assert_eq!(err.to_string(), "no such container: c-42");
    /// assert!(matches!(err, RuntimeError::Other(_)));
    /// ```
    pub fn other(reason: impl Display) -> Self {
        Self::Other(reason.to_string())
    }

    /// The machine-readable reason sent with the failure
    /// (`DispatchResult::code`), for the cases a caller can act on.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            RuntimeError::UnknownOperation(_) => Some(switchyard_proto::UNKNOWN_OPERATION),
            RuntimeError::InvalidArgs(_) => Some(switchyard_proto::INVALID_ARGS),
            RuntimeError::NotFound(_) => Some("not_found"),
            _ => None,
        }
    }
}

/// Runs agents. The SDK ([`crate::run`]) owns the control channel, dedup and
/// the inbox; a runtime only performs operations and reports phases.
///
/// The SDK calls `apply` and `deliver` for one agent strictly one at a
/// time, in the order the hub sent them; calls for different agents may
/// run concurrently.
///
/// # Example
///
/// A runtime whose agents only keep their messages in memory. It reports
/// every phase change it makes on its status feed, with a [`next_seq`].
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
///
/// use serde_json::{Value, json};
/// use switchyard_broker::{Runtime, RuntimeError, next_seq};
/// use switchyard_proto::{AgentMessage, AgentSpec, AgentStatus, Dispatch, Op, Phase};
/// use tokio::sync::broadcast;
/// use uuid::Uuid;
///
/// #[derive(Debug)]
/// struct InMemory {
///     agents: Mutex<HashMap<Uuid, (Phase, Vec<Value>)>>,
///     feed: broadcast::Sender<AgentStatus>,
/// }
///
/// fn status(agent_id: Uuid, phase: Phase) -> AgentStatus {
///     AgentStatus { agent_id, phase, seq: next_seq(), exit_code: None, detail: None }
/// }
///
/// #[async_trait::async_trait]
/// impl Runtime for InMemory {
///     async fn apply(&self, dispatch: &Dispatch) -> Result<Value, RuntimeError> {
///         let phase = match dispatch.op {
///             Op::Create => Phase::Created,
///             Op::Start | Op::Restart => Phase::Running,
///             Op::Stop => Phase::Stopped,
///             Op::Delete => Phase::Deleted,
///             // The SDK hands calls to `Runtime::call`, never here.
///             Op::Call => return Err(RuntimeError::other("not a lifecycle op")),
///         };
///         let mut agents = self.agents.lock().expect("not poisoned");
///         let agent = agents.entry(dispatch.agent_id).or_insert((Phase::Created, Vec::new()));
///         if agent.0 == Phase::Deleted && phase != Phase::Deleted {
///             return Err(RuntimeError::Deleted(dispatch.agent_id));
///         }
///         agent.0 = phase;
///         // No subscriber (no session) is fine: the next `hello` carries it.
///         let _ = self.feed.send(status(dispatch.agent_id, phase));
///         Ok(json!({ "phase": phase }))
///     }
///
///     async fn deliver(&self, message: &AgentMessage) -> Result<(), RuntimeError> {
///         let mut agents = self.agents.lock().expect("not poisoned");
///         match agents.get_mut(&message.agent_id) {
///             Some((Phase::Running, inbox)) => {
///                 inbox.push(message.body.clone());
///                 Ok(())
///             }
///             Some(_) => Err(RuntimeError::NotRunning),
///             None => Err(RuntimeError::other(format!("no agent {}", message.agent_id))),
///         }
///     }
///
///     fn statuses(&self) -> Vec<AgentStatus> {
///         let agents = self.agents.lock().expect("not poisoned");
///         agents
///             .iter()
///             .filter(|(_, (phase, _))| *phase != Phase::Deleted)
///             .map(|(id, (phase, _))| status(*id, *phase))
///             .collect()
///     }
///
///     fn subscribe(&self) -> broadcast::Receiver<AgentStatus> {
///         self.feed.subscribe()
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), RuntimeError> {
/// let runtime = InMemory { agents: Mutex::default(), feed: broadcast::channel(64).0 };
/// let mut feed = runtime.subscribe();
/// let agent_id = Uuid::new_v4();
/// let start = Dispatch {
///     id: Uuid::new_v4(),
///     agent_id,
///     op: Op::Start,
///     name: None,
///     agent: AgentSpec { name: "echo".into(), command: vec!["cat".into()], env: Default::default() },
///     args: Value::Null,
/// };
/// assert_eq!(runtime.apply(&start).await?, json!({ "phase": "running" }));
/// assert_eq!(feed.try_recv().expect("a status").phase, Phase::Running);
///
/// let hello = AgentMessage { id: Uuid::new_v4(), agent_id, seq: 1, body: json!("hello"), attachments: vec![] };
/// runtime.deliver(&hello).await?;
/// let elsewhere = AgentMessage { agent_id: Uuid::new_v4(), ..hello };
/// let err = runtime.deliver(&elsewhere).await.unwrap_err();
/// assert!(err.to_string().starts_with("no agent "));
/// # Ok(())
/// # }
/// ```
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Performs a lifecycle op (create, start, stop, restart, delete) and
    /// returns details for the hub (e.g. `{"phase": .., "pid": ..}`). An
    /// `Err` is reported as a failed dispatch with its `Display` text. Called at
    /// most once per dispatch id (the SDK remembers outcomes).
    async fn apply(&self, dispatch: &Dispatch) -> Result<Value, RuntimeError>;

    /// Runs the named operation of a call (`dispatch.op` is `call`,
    /// `dispatch.name` the operation, `dispatch.args` its arguments) and
    /// returns its result for the caller. Like `apply`, at most once per
    /// dispatch id, in the agent's order. The default knows no operation:
    /// every call is answered with [`RuntimeError::UnknownOperation`], a
    /// failed result the caller reads as `unknown_operation`.
    async fn call(&self, dispatch: &Dispatch) -> Result<Value, RuntimeError> {
        Err(RuntimeError::UnknownOperation(
            dispatch.name.clone().unwrap_or_default(),
        ))
    }

    /// Runs a named operation of the runtime itself, for a caller waiting
    /// on `POST /v1/brokers/{broker}/ops/{name}` (`call.args` are its
    /// arguments). At most once per call id; broker calls run one at a
    /// time, in arrival order, apart from every agent's work. The default
    /// knows no operation, like [`Runtime::call`].
    async fn broker_call(&self, call: &BrokerCall) -> Result<Value, RuntimeError> {
        Err(RuntimeError::UnknownOperation(call.name.clone()))
    }

    /// Hands a message to the running agent. Called once per message id,
    /// after the SDK has durably appended it to the agent's `inbox.jsonl`;
    /// the message is acknowledged whatever this returns (the inbox is the
    /// durable record), an `Err` is only logged.
    async fn deliver(&self, message: &AgentMessage) -> Result<(), RuntimeError>;

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
