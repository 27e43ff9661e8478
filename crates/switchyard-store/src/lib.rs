#![doc = include_str!("../README.md")]

mod batch;
mod connect;
mod error;
mod ids;
mod model;
mod postgres;
mod sqlite;
mod store;

pub use connect::{Database, OpenError, open, open_database};
pub use error::{StoreError, StoreResult};
pub use ids::{AgentId, BrokerId, IntentId, MessageId, ReplicaId, SessionId};
pub use model::{
    Acked, Affinity, Agent, Broker, BrokerStatus, DispatchIntent, Inserted, IntentFilter,
    IntentOutcome, IntentState, Message, MessageState, NewAgent, NewIntent, NewMessage, Op, Phase,
    Replica, RequeuePolicy, RequeueReport, SessionHeartbeat, UnknownWord,
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use store::{Singleton, Store};
