//! In-process event bus of one replica: agent status changes and finished
//! dispatches, for callers waiting on a lifecycle outcome.
//!
//! Invariant 6: an event is published only after the transaction that made
//! it true has committed (every publisher calls the store first). A waiter
//! that misses events (it lagged, or the outcome happened elsewhere) falls
//! back to re-reading the row, so events are never needed for correctness.

use switchyard_store::{Agent, DispatchIntent};
use tokio::sync::broadcast;

use crate::command_bus::Notifier;

/// Something that became true in storage.
#[derive(Clone, Debug)]
pub(crate) enum HubEvent {
    /// An agent's phase changed (the row after the change).
    AgentStatus(Agent),
    /// A dispatch intent reached `done` or `failed` (the row after the change).
    DispatchFinished(DispatchIntent),
}

/// Local fan-out of events, plus (on PostgreSQL) the command bus that
/// carries them to the other replicas.
#[derive(Clone, Debug)]
pub(crate) struct EventBus {
    tx: broadcast::Sender<HubEvent>,
    remote: Option<Notifier>,
}

impl EventBus {
    pub(crate) fn new(remote: Option<Notifier>) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self { tx, remote }
    }

    /// Subscribe before writing whatever you then wait for.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// Publishes a fact this replica just committed, here and on every
    /// other replica.
    pub(crate) fn publish(&self, event: HubEvent) {
        if let Some(remote) = &self.remote {
            remote.event(&event);
        }
        self.publish_local(event);
    }

    /// Publishes on this replica only (for facts learnt from the bus).
    pub(crate) fn publish_local(&self, event: HubEvent) {
        // Having no subscriber is normal.
        let _ = self.tx.send(event);
    }
}
