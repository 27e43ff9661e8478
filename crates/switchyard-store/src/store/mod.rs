//! The storage interface, by aggregate: each trait keeps one kind of state
//! and holds its rules once, for both backends ([`crate::PgStore`],
//! [`crate::SqliteStore`]). A backend writes only the statements whose text
//! genuinely differs, behind the `*Dialect` traits. The conformance suite in
//! `tests/conformance.rs` runs each test against both.

mod affinity;
mod agent;
mod attachment;
mod auth;
mod broker;
mod event;
mod housekeeping;
mod replica;
mod work;

pub use affinity::AffinityStore;
pub use agent::AgentStore;
pub use attachment::{ATTACHMENT_CHUNK, AttachmentStore};
pub use auth::AuthStore;
pub use broker::BrokerStore;
pub(crate) use event::EventDialect;
pub use event::{EVENT_LOG_CHANNEL, EventStore, MAX_EVENTS_PER_READ};
pub(crate) use housekeeping::HousekeepingDialect;
pub use housekeeping::{Housekeeping, Singleton};
pub use replica::ReplicaStore;
pub(crate) use work::WorkDialect;
pub use work::WorkStore;

/// Durable state shared by all replicas of one hub: every aggregate.
/// `Arc<dyn Store>` is what the hub holds; methods of the aggregates are
/// called on it directly.
///
/// Invariants every implementation keeps (DESIGN.md):
/// - affinity is claimed newest-wins and cleared only by compare-and-clear
///   on the same (replica, session);
/// - a pending intent or message is claimed by exactly one caller, and
///   within one agent rows are claimed in sequence order, never past a row
///   that another replica holds in flight;
/// - `done`/`failed`/`delivered`/`expired` are final: no call moves a row
///   out of them;
/// - batch inserts are all-or-none, and a repeated idempotency key returns
///   the original row instead of a second one.
pub trait Store:
    ReplicaStore
    + BrokerStore
    + AffinityStore
    + AgentStore
    + WorkStore
    + AttachmentStore
    + AuthStore
    + EventStore
    + Housekeeping
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
}

impl<T> Store for T where
    T: ReplicaStore
        + BrokerStore
        + AffinityStore
        + AgentStore
        + WorkStore
        + AttachmentStore
        + AuthStore
        + EventStore
        + Housekeeping
        + Send
        + Sync
        + std::fmt::Debug
        + 'static
{
}
