//! Committed facts fanned out on this replica, for callers waiting on a
//! lifecycle outcome, and recorded in the durable event log
//! ([`crate::event_log`]) that `GET /v1/events` serves.
//!
//! Invariant 6: an event is published only after the transaction that made
//! it true has committed (every publisher calls the store first, then
//! `Bus::publish`, which reaches this fan-out and the other replicas). A
//! waiter that misses events (it lagged, or the outcome happened elsewhere)
//! falls back to re-reading the row, so events are never needed for
//! correctness.

use switchyard_store::{
    Agent, AgentId, Broker, BrokerId, DispatchIntent, IntentId, MessageRef, RequeueReport, Store,
};
use tokio::sync::broadcast;

use crate::bus::Bus;
use crate::event_log::EventLog;

/// Something that became true in storage.
#[derive(Clone, Debug)]
pub(crate) enum HubEvent {
    /// An agent's phase changed (the row after the change).
    AgentStatus(Agent),
    /// A dispatch intent reached `done` or `failed` (the row after the change).
    DispatchFinished(DispatchIntent),
    /// A session of the broker started (the row after the claim).
    BrokerOnline(Broker),
    /// The broker's session ended and it holds no other (the row after).
    BrokerOffline(Broker),
    /// Its broker acked it.
    MessageDelivered(MessageRef),
    /// Its TTL passed before it was delivered.
    MessageExpired(MessageRef),
    /// It was claimed `max_attempts` times (a dead letter).
    MessageFailed(MessageRef),
}

/// The local fan-out, and the way into the event log. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<HubEvent>,
    log: EventLog,
}

impl Events {
    pub(crate) fn new(log: EventLog) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self { tx, log }
    }

    /// The durable log behind `GET /v1/events`.
    pub(crate) fn log(&self) -> &EventLog {
        &self.log
    }

    /// Records a fact this replica committed in the event log and
    /// publishes it here. Buses call it; everyone else calls
    /// [`crate::bus::Bus::publish`].
    pub(crate) fn publish_committed(&self, event: HubEvent) {
        self.log.record(&event);
        // Only lifecycle outcomes are waited for here; a delivered message
        // per ack would only wake every waiting call for nothing.
        if matches!(
            event,
            HubEvent::AgentStatus(_) | HubEvent::DispatchFinished(_)
        ) {
            self.publish_local(event);
        }
    }

    /// Subscribe before writing whatever you then wait for.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// Publishes a committed fact on this replica only (not logged: for
    /// facts another replica committed and logged).
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

/// Publishes that `broker` went online or offline, with its row as it is
/// now (after the commit that made it so). A broker deleted meanwhile has
/// nothing to announce.
pub(crate) async fn announce_broker(
    store: &dyn Store,
    bus: &dyn Bus,
    broker: BrokerId,
    online: bool,
) {
    match store.broker(broker).await {
        Ok(row) if online => bus.publish(HubEvent::BrokerOnline(row)),
        Ok(row) => bus.publish(HubEvent::BrokerOffline(row)),
        Err(err) => tracing::debug!(%broker, %err, "cannot read a broker to announce it"),
    }
}

/// Publishes the dead letters of a requeue pass: each failed message, and
/// each failed dispatch as the finished row it now is.
pub(crate) async fn publish_dead_letters(store: &dyn Store, bus: &dyn Bus, report: &RequeueReport) {
    for message in &report.failed_messages {
        bus.publish(HubEvent::MessageFailed(*message));
    }
    for id in &report.failed_intents {
        match store.intent(*id).await {
            Ok(row) => bus.publish(HubEvent::DispatchFinished(row)),
            Err(err) => tracing::debug!(%id, %err, "cannot read a failed dispatch to publish it"),
        }
    }
}
