//! Committed facts (agent status changes, finished dispatches) fanned out
//! on this replica, for callers waiting on a lifecycle outcome and for
//! `GET /v1/events`.
//!
//! Invariant 6: an event is published only after the transaction that made
//! it true has committed (every publisher calls the store first, then
//! `Bus::publish`, which reaches this fan-out and the other replicas). A
//! waiter that misses events (it lagged, or the outcome happened elsewhere)
//! falls back to re-reading the row, so events are never needed for
//! correctness.

use switchyard_store::{Agent, AgentId, DispatchIntent, IntentId, Store};
use tokio::sync::broadcast;

/// Something that became true in storage.
#[derive(Clone, Debug)]
pub(crate) enum HubEvent {
    /// An agent's phase changed (the row after the change).
    AgentStatus(Agent),
    /// A dispatch intent reached `done` or `failed` (the row after the change).
    DispatchFinished(DispatchIntent),
}

/// The local fan-out. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<HubEvent>,
}

impl Default for Events {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self { tx }
    }
}

impl Events {
    /// Subscribe before writing whatever you then wait for.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// Publishes a committed fact on this replica only.
    pub(crate) fn publish_local(&self, event: HubEvent) {
        // Having no subscriber is normal.
        let _ = self.tx.send(event);
    }

    /// Publishes facts another replica committed and named by id: the rows
    /// are re-read here, so what is published is what storage holds.
    pub(crate) async fn republish(
        &self,
        store: &dyn Store,
        dispatches: Vec<IntentId>,
        agents: Vec<AgentId>,
    ) {
        for id in dispatches {
            match store.intent(id).await {
                Ok(row) => self.publish_local(HubEvent::DispatchFinished(row)),
                Err(err) => tracing::debug!(%err, "event names a dispatch that cannot be read"),
            }
        }
        for id in agents {
            match store.agent(id).await {
                Ok(row) => self.publish_local(HubEvent::AgentStatus(row)),
                Err(err) => tracing::debug!(%err, "event names an agent that cannot be read"),
            }
        }
    }
}
