//! The listening half of the PostgreSQL bus: LISTEN on a dedicated
//! connection, decode, hand over.
//!
//! After every (re)connect the order is: LISTEN (committed), then wake every
//! local session's drain, then wait for notifications, so nothing sent while
//! the listener was down stays stranded (invariant 5).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPoolOptions};
use switchyard_store::{ReplicaId, Store};
use tokio_util::sync::CancellationToken;

use super::sender::{EVENT_CHANNEL, EventPayload, WAKE_CHANNEL, WakePayload};
use crate::events::Events;
use crate::metrics::Metrics;
use crate::session::registry::Registry;

/// A notification this replica cannot read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("unreadable payload on {channel}: {source}")]
    Payload {
        channel: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("notification on an unknown channel {0}")]
    Channel(String),
}

/// What a notification says.
#[derive(Debug)]
enum Notice {
    Wake(WakePayload),
    Event(EventPayload),
}

fn decode(notification: &PgNotification) -> Result<Notice, DecodeError> {
    let payload = notification.payload();
    match notification.channel() {
        WAKE_CHANNEL => serde_json::from_str(payload)
            .map(Notice::Wake)
            .map_err(|source| DecodeError::Payload {
                channel: WAKE_CHANNEL,
                source,
            }),
        EVENT_CHANNEL => serde_json::from_str(payload)
            .map(Notice::Event)
            .map_err(|source| DecodeError::Payload {
                channel: EVENT_CHANNEL,
                source,
            }),
        other => Err(DecodeError::Channel(other.to_owned())),
    }
}

/// Listens for wake-ups and events on a dedicated connection.
pub(crate) struct Listener {
    pub(crate) options: PgConnectOptions,
    pub(crate) me: ReplicaId,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) events: Events,
    pub(crate) metrics: Metrics,
    /// Whether the listener is connected (readiness).
    pub(crate) listening: Arc<AtomicBool>,
    pub(crate) shutdown: CancellationToken,
}

impl Listener {
    /// (Re)connects forever with jittered backoff.
    pub(crate) async fn run(self) {
        let mut backoff = reconnect_backoff();
        let mut connected_before = false;
        while !self.shutdown.is_cancelled() {
            match self.listen().await {
                Ok(mut listener) => {
                    if connected_before {
                        self.metrics.command_bus_reconnects.inc();
                    }
                    connected_before = true;
                    backoff = reconnect_backoff();
                    self.after_connect();
                    self.receive(&mut listener).await;
                    self.listening.store(false, Ordering::Relaxed);
                }
                Err(err) => {
                    tracing::warn!(%err, "command bus listener cannot connect; retrying");
                }
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        // A pool of one, so the listener's connection (and its LISTENs) is
        // ours alone and never goes through a transaction pooler.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(self.options.clone());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen_all([WAKE_CHANNEL, EVENT_CHANNEL]).await?;
        Ok(listener)
    }

    fn after_connect(&self) {
        self.listening.store(true, Ordering::Relaxed);
        self.registry.wake_all();
        tracing::info!("command bus listening");
    }

    async fn receive(&self, listener: &mut PgListener) {
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return,
                next = listener.try_recv() => next,
            };
            match next {
                Ok(Some(notification)) => self.handle(&notification),
                // sqlx lost the connection and re-established it (LISTENs
                // included); notifications sent meanwhile are gone: drain.
                Ok(None) => {
                    self.metrics.command_bus_reconnects.inc();
                    tracing::warn!("command bus listener reconnected; draining");
                    self.after_connect();
                }
                Err(err) => {
                    tracing::warn!(%err, "command bus listener failed; rebuilding");
                    return;
                }
            }
        }
    }

    fn handle(&self, notification: &PgNotification) {
        self.metrics.notifications_received.inc();
        match decode(notification) {
            Ok(Notice::Wake(wake)) if wake.r == self.me => {
                for broker in wake.b {
                    self.registry.wake(broker);
                }
            }
            Ok(Notice::Event(event)) if event.o != self.me => {
                // Reading the rows must not hold up the listener.
                let store = self.store.clone();
                let events = self.events.clone();
                tokio::spawn(async move { events.republish(&*store, event.d, event.a).await });
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "unreadable notification"),
        }
    }
}

fn reconnect_backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_jitter()
        .without_max_times()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .build()
}
