//! The command bus: how a replica wakes the owner of a broker's session and
//! tells every replica about facts it committed.
//!
//! Invariant 5: the bus is a hint. Nothing depends on a wake-up or an event
//! arriving: every session drains on connect, after every listener
//! (re)connect and on the periodic backstop, and waiting callers re-read
//! their row. So an implementation may drop, coalesce or delay anything.
//!
//! Two implementations: PostgreSQL LISTEN/NOTIFY between replicas
//! ([`postgres`]) and, for the single replica of a SQLite hub,
//! [`in_process`]. Callers hold an `Arc<dyn Bus>` and never ask which.

pub(crate) mod in_process;
pub(crate) mod postgres;

use std::fmt::Debug;

use switchyard_store::{BrokerId, ReplicaId};

use crate::events::HubEvent;

pub(crate) trait Bus: Send + Sync + Debug {
    /// Asks replica `owner` to drain `broker`: it has new work. `urgent`
    /// when a caller waits for the outcome (lifecycle calls); other
    /// wake-ups may be delayed a little to share one notification. Returns
    /// false when no wake-up can reach `owner` (a replica this bus does not
    /// know): the work then waits for the broker's next session.
    fn wake(&self, owner: ReplicaId, broker: BrokerId, urgent: bool) -> bool;

    /// Publishes a fact this replica just committed, on this replica and on
    /// every other one. Call it only after the commit (invariant 6).
    fn publish(&self, event: HubEvent);

    /// Whether this replica currently hears wake-ups (readiness).
    fn is_listening(&self) -> bool;
}
