#![doc = include_str!("../README.md")]

mod connection;
mod dedup;
mod executor;
mod files;
mod inbox;
mod jsonl;
mod layout;
pub mod operations;
mod poll;
mod process;
mod reports;
mod runtime;
mod session;

pub use connection::{BrokerConfig, BrokerError, Transport, UPGRADE_RETRY, run};
pub use inbox::inbox_line;
pub use layout::agent_dir;
pub use process::{INHERITED_ENV, ProcessConfig, ProcessError, ProcessRuntime};
pub use runtime::{Runtime, RuntimeError, next_seq};
