#![doc = include_str!("../README.md")]

mod batch;
mod connect;
mod copy;
mod dialect;
mod error;
mod ids;
mod model;
mod postgres;
mod rules;
mod sqlite;
mod store;

pub use connect::{Database, OpenError, open, open_database};
pub use copy::{CopyError, CopyReport, HubCopy, HubOutcome, TableCount};
pub use error::{Conflict, Entity, Invalid, StoreError, StoreResult};
pub use ids::{
    AgentId, AttachmentId, BroadcastId, BrokerId, HubId, IntentId, MessageId, ReplicaId, SessionId,
};
pub use model::{
    Acked, Affinity, Agent, Attachment, Broadcast, Broker, BrokerStatus, CancelOutcome,
    DispatchIntent, EventBounds, Inserted, IntentFilter, IntentOutcome, IntentState, LoggedEvent,
    MAX_BROADCAST_AGENTS, Message, MessageRef, MessageState, NewAgent, NewAttachment, NewBroadcast,
    NewBrokerCall, NewEvent, NewIntent, NewMessage, Op, Phase, QueueDepth, Replica, RequeuePolicy,
    RequeueReport, SessionHeartbeat, StatusReport, Target, Transport, UnknownWord,
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use store::{
    ATTACHMENT_CHUNK, AffinityStore, AgentStore, AttachmentStore, AuthStore, BrokerStore,
    EVENT_LOG_CHANNEL, EventStore, Housekeeping, MAX_EVENTS_PER_READ, ReplicaStore, Singleton,
    Store, WorkStore,
};

/// The aggregate traits, for calling store methods on a concrete
/// [`PgStore`] or [`SqliteStore`] or through a generic `S: Store`
/// (`dyn Store` needs no import).
pub mod prelude {
    pub use crate::store::{
        AffinityStore, AgentStore, AttachmentStore, AuthStore, BrokerStore, EventStore,
        Housekeeping, ReplicaStore, Singleton, Store, WorkStore,
    };
}
