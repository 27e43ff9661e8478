//! This replica's entry in the replica registry.
//!
//! The registry row is how other replicas know this one is alive: the
//! heartbeat loop refreshes `last_seen` every `heartbeat_interval`. If the
//! row has vanished (another replica judged this one dead and reaped it,
//! which also released its brokers' affinities), the loop registers again.
//! On clean shutdown the server task removes the row (after the sockets
//! have closed), releasing the affinities at once, so nobody has to wait for
//! the liveness window to expire.

use std::sync::Arc;
use std::time::Duration;

use switchyard_store::{ReplicaId, Store, StoreResult};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Heartbeats the (already registered) replica until `shutdown` is cancelled.
pub(crate) async fn run_heartbeat(
    store: Arc<dyn Store>,
    metrics: Metrics,
    id: ReplicaId,
    address: String,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; we registered at startup
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match heartbeat(&*store, &metrics, id, &address, &shutdown).await {
            Ok(()) => metrics.database_up.set(1),
            Err(err) => {
                metrics.database_up.set(0);
                tracing::warn!(%err, "replica heartbeat failed; retrying next interval");
            }
        }
    }
}

async fn heartbeat(
    store: &dyn Store,
    metrics: &Metrics,
    id: ReplicaId,
    address: &str,
    shutdown: &CancellationToken,
) -> StoreResult<()> {
    if store.heartbeat_replica(id).await? {
        metrics.replica_heartbeats.inc();
    } else if !shutdown.is_cancelled() {
        // (When shutting down, the row is gone because a clean shutdown
        // deregistered the replica while this heartbeat ran: registering
        // again would leave a row that looks alive for the liveness window,
        // and `switchyard db copy` would refuse the file meanwhile.)
        tracing::warn!(replica = %id, "registry row was reaped; registering again");
        store.register_replica(id, address).await?;
        metrics.replica_reregistrations.inc();
    }
    Ok(())
}
