//! The broker SDK and the reference runtime.
//!
//! [`run`] holds a broker's control channel to a hub (signed handshake,
//! reconnect with backoff, heartbeats) and takes care of the protocol's
//! guarantees on the broker side: a dispatch id runs at most once (its
//! outcome is remembered, also across restarts, and re-sent on
//! redelivery), and a message is acknowledged only once it is durably in
//! the agent's `inbox.jsonl`, where each message id appears once. What an
//! agent *is* is up to a [`Runtime`]; [`ProcessRuntime`] runs agents as
//! local processes.

mod connection;
mod dedup;
mod executor;
mod inbox;
mod jsonl;
mod layout;
mod process;
mod runtime;
mod session;

pub use connection::{BrokerConfig, BrokerError, run};
pub use inbox::inbox_line;
pub use layout::agent_dir;
pub use process::{ProcessConfig, ProcessError, ProcessRuntime};
pub use runtime::{Runtime, RuntimeError, next_seq};
