//! What every request handler and session of this replica shares.

use std::sync::Arc;

use switchyard_store::{ReplicaId, Store};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::config::HubConfig;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::originator::Originator;
use crate::session::Registry;

/// One allocation per replica; handlers clone the `Arc`.
pub(crate) type HubState = Arc<Shared>;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) replica_id: ReplicaId,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) metrics: Metrics,
    pub(crate) config: Arc<HubConfig>,
    /// This replica's control-channel sessions.
    pub(crate) registry: Arc<Registry>,
    /// Committed facts on this replica (subscribe here).
    pub(crate) events: Events,
    /// Wake-ups and committed facts between replicas (publish here).
    pub(crate) bus: Arc<dyn Bus>,
    /// Writes, routes and waits for API calls.
    pub(crate) originator: Originator,
    /// Tracks control-channel sessions, which `axum::serve` does not wait for.
    pub(crate) sockets: TaskTracker,
    /// One permit per control-channel session, up to `max_sessions`.
    pub(crate) session_permits: Arc<tokio::sync::Semaphore>,
    /// One permit per message with files being received, up to
    /// [`crate::api::MAX_UPLOADS`]: each may stage up to
    /// `max_attachment_bytes` on this replica's disk.
    pub(crate) upload_permits: Arc<tokio::sync::Semaphore>,
    pub(crate) shutdown: CancellationToken,
}
