//! The bus of a hub that runs alone (SQLite): there is no other replica to
//! wake or tell, so publishing is the local fan-out and a wake-up for
//! another replica (a stale affinity left by a previous process) reaches
//! nobody; the broker's next session drains the work.

use switchyard_store::{BrokerId, ReplicaId};

use super::Bus;
use crate::events::{Events, HubEvent};

#[derive(Debug)]
pub(crate) struct InProcessBus {
    events: Events,
}

impl InProcessBus {
    pub(crate) fn new(events: Events) -> Self {
        Self { events }
    }
}

impl Bus for InProcessBus {
    fn wake(&self, _owner: ReplicaId, _broker: BrokerId, _urgent: bool) -> bool {
        false
    }

    fn publish(&self, event: HubEvent) {
        self.events.publish_committed(event);
    }

    fn is_listening(&self) -> bool {
        true
    }
}
