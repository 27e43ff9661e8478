//! The command bus on PostgreSQL: LISTEN/NOTIFY, used only as a wake-up.
//!
//! Two channels carry ids, never bodies (the payload format is in
//! [`sender`], which writes it; [`listener`] reads it):
//! - `switchyard_wake`: "these brokers, whose sessions replica r owns, have
//!   new work";
//! - `switchyard_event`: "these dispatches finished / these agents changed
//!   phase" (committed facts), so a caller waiting on another replica
//!   learns the outcome.

pub(crate) mod listener;
pub(crate) mod sender;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use switchyard_store::{ReplicaId, Store};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::Events;
use crate::metrics::Metrics;
use crate::session::registry::Registry;
use listener::Listener;
use sender::PostgresBus;

/// What the bus of one replica needs.
#[derive(Debug)]
pub(crate) struct Setup {
    /// Where NOTIFYs are sent from (the main pool).
    pub(crate) pool: PgPool,
    /// Where the listener connects (never through a transaction pooler).
    pub(crate) listen: PgConnectOptions,
    pub(crate) me: ReplicaId,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) events: Events,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
}

/// Starts the sender and the listener on `tasks`; returns the bus.
pub(crate) fn start(setup: Setup, tasks: &TaskTracker) -> PostgresBus {
    let listening = Arc::new(AtomicBool::new(false));
    let (bus, send_loop) = PostgresBus::new(
        setup.pool,
        setup.me,
        setup.events.clone(),
        listening.clone(),
        setup.metrics.clone(),
        setup.shutdown.clone(),
    );
    tasks.spawn(send_loop);
    tasks.spawn(
        Listener {
            options: setup.listen,
            me: setup.me,
            store: setup.store,
            registry: setup.registry,
            events: setup.events,
            metrics: setup.metrics,
            listening,
            shutdown: setup.shutdown,
        }
        .run(),
    );
    bus
}
