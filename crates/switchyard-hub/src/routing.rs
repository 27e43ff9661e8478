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
//! work is committed *before* affinity is read here, and a new session
//! claims affinity *before* its first drain. Either this read sees the new
//! owner (and wakes it), or the new owner's claim came later, so its first
//! drain runs after the commit and finds the work. A wake-up lost on the
//! way is covered by the drain backstop (1 s by default).

use serde::Serialize;
use switchyard_store::BrokerId;

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

/// Wakes whoever must send the broker's new work, and says how. `urgent`
/// when the caller waits for the outcome: its wake-up skips the debounce.
pub(crate) async fn route_work(state: &HubState, broker: BrokerId, urgent: bool) -> Route {
    let route = if state.sessions.wake(broker) {
        Route::Local
    } else {
        // Read affinity from storage every time: a cached owner could be
        // a replica that lost the session a moment ago.
        match state.store.broker(broker).await {
            Ok(row) => match (row.connected_replica, &state.notifier) {
                (Some(owner), Some(notifier)) if owner != state.replica_id => {
                    notifier.wake(owner, broker, urgent);
                    Route::Forward
                }
                _ => Route::Queued,
            },
            Err(err) => {
                tracing::warn!(%broker, %err, "cannot read affinity; the work waits for a drain");
                Route::Queued
            }
        }
    };
    state
        .metrics
        .routes
        .with_label_values(&[route.as_str()])
        .inc();
    route
}
