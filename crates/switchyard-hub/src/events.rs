//! In-process event bus of one replica: agent status changes and finished
//! dispatches, for callers waiting on a lifecycle outcome.
//!
//! Invariant 6: an event is published only after the transaction that made
//! it true has committed (every publisher calls the store first). A waiter
//! that misses events (it lagged, or the outcome happened elsewhere) falls
//! back to re-reading the row, so events are never needed for correctness.

use switchyard_store::{Agent, DispatchIntent};
use tokio::sync::broadcast;

/// Something that became true in storage.
#[derive(Clone, Debug)]
pub(crate) enum HubEvent {
    /// An agent's phase changed (the row after the change).
    AgentStatus(Agent),
    /// A dispatch intent reached `done` or `failed` (the row after the change).
    DispatchFinished(DispatchIntent),
}

#[derive(Clone, Debug)]
pub(crate) struct EventBus {
    tx: broadcast::Sender<HubEvent>,
}

impl EventBus {
    pub(crate) fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self { tx }
    }

    /// Subscribe before writing whatever you then wait for.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// Publishes a committed fact; having no subscriber is normal.
    pub(crate) fn publish(&self, event: HubEvent) {
        let _ = self.tx.send(event);
    }
}
