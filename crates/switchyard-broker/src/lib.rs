#![doc = include_str!("../README.md")]

mod connection;
mod dedup;
mod executor;
mod inbox;
mod jsonl;
mod layout;
pub mod operations;
mod process;
mod runtime;
mod session;

pub use connection::{BrokerConfig, BrokerError, run};
pub use inbox::inbox_line;
pub use layout::agent_dir;
pub use process::{INHERITED_ENV, ProcessConfig, ProcessError, ProcessRuntime};
pub use runtime::{Runtime, RuntimeError, next_seq};
