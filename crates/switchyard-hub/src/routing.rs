//! Getting new work to the replica that holds the broker's socket.
//!
//! Called after the intent or message is committed. Routes:
//! - `local`: the session is on this replica: wake its drain now (no
//!   NOTIFY on this path, invariant 7);
//! - `forward`: storage says another replica holds the session: send it a
//!   coalesced wake-up on the command bus;
//! - `queued`: nobody holds it: the work waits for the broker's next
//!   session, whose first drain picks it up.
//!
//! Why nothing is stranded when affinity moves while work is written: the
//! insert reads the holder of the broker's session under a lock that
//! `claim_affinity` has to wait for (see `Inserted::owner`), and a new
//! session claims affinity *before* its first drain. Either the insert saw
//! the new holder (and wakes it), or the new claim came after the commit,
//! so that session's first drain finds the work. Work that was not just
//! inserted (a retried call) is routed by reading affinity from storage
//! after its commit, with the same argument. A wake-up lost on the way is
//! covered by the drain backstop (1 s by default).

use serde::Serialize;
use switchyard_store::{BrokerId, ReplicaId};

use crate::HubState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Route {
    Local,
    Forward,
    Queued,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Forward => "forward",
            Route::Queued => "queued",
        }
    }
}

/// Wakes whoever must send the broker's work, reading from storage which
/// replica holds its session. `urgent` when the caller waits for the
/// outcome: its wake-up skips the debounce.
pub(crate) async fn route_work(state: &HubState, broker: BrokerId, urgent: bool) -> Route {
    if state.sessions.wake(broker) {
        return counted(state, Route::Local);
    }
    // Never cached: a cached holder could be a replica that lost the
    // session a moment ago.
    match state.store.broker(broker).await {
        Ok(row) => forward_or_queue(state, broker, row.connected_replica, urgent),
        Err(err) => {
            tracing::warn!(%broker, %err, "cannot read affinity; the work waits for a drain");
            counted(state, Route::Queued)
        }
    }
}

/// Wakes whoever must send work just inserted, given the holder its insert
/// read (`Inserted::owner`): no second read of storage.
pub(crate) fn route_to_holder(
    state: &HubState,
    broker: BrokerId,
    holder: Option<ReplicaId>,
    urgent: bool,
) -> Route {
    if state.sessions.wake(broker) {
        return counted(state, Route::Local);
    }
    forward_or_queue(state, broker, holder, urgent)
}

/// The broker has no session here: wake its holder over the command bus,
/// or leave the work for its next session.
fn forward_or_queue(
    state: &HubState,
    broker: BrokerId,
    holder: Option<ReplicaId>,
    urgent: bool,
) -> Route {
    let route = match (holder, &state.notifier) {
        (Some(owner), Some(notifier)) if owner != state.replica_id => {
            notifier.wake(owner, broker, urgent);
            Route::Forward
        }
        _ => Route::Queued,
    };
    counted(state, route)
}

fn counted(state: &HubState, route: Route) -> Route {
    state
        .metrics
        .routes
        .with_label_values(&[route.as_str()])
        .inc();
    route
}
