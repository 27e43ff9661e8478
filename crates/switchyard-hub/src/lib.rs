//! A Switchyard hub replica.
//!
//! [`Hub::start`] binds the HTTP listener, registers the replica in the
//! shared registry, starts its background tasks and serves until
//! [`RunningHub::shutdown`] (or the process's shutdown signal) stops it.
//! Tests start several hubs in one process this way.

mod api;
mod api_error;
mod auth;
mod control;
mod drain;
mod events;
mod lookup;
mod metrics;
mod replica;
mod router;
mod sessions;
mod sweeper;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_store::{ReplicaId, RequeuePolicy, Store, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api_error::ApiError;
pub use auth::{random_secret, token_digest};
pub use metrics::Metrics;

use events::EventBus;
use sessions::Sessions;

/// Settings of one replica.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address other replicas and operators see in the registry; defaults
    /// to `http://<bound address>`.
    pub advertise: Option<String>,
    /// How often the replica refreshes its registry row.
    pub replica_heartbeat_interval: Duration,
    /// A replica not seen for this long is dead.
    pub replica_stale_after: Duration,
    /// How often the hub pings each broker and heartbeats its session; a
    /// broker silent for three intervals is disconnected.
    pub heartbeat_interval: Duration,
    /// Longest a broker's pending work waits for a missed wake-up.
    pub drain_backstop: Duration,
    /// Rolling window of a lifecycle call without progress before 504.
    pub lifecycle_timeout: Duration,
    /// How long a dispatch intent may wait for its broker before it fails.
    pub intent_deadline: Duration,
    /// How long an undelivered message lives.
    pub message_ttl: Duration,
    /// How often the sweeper runs.
    pub sweep_interval: Duration,
    /// A claim older than this is abandoned and requeued.
    pub claim_lease: Duration,
    /// Claims after which abandoned work fails instead of being requeued.
    pub max_attempts: i32,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            advertise: None,
            replica_heartbeat_interval: Duration::from_secs(2),
            replica_stale_after: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(10),
            drain_backstop: Duration::from_secs(1),
            lifecycle_timeout: Duration::from_secs(60),
            intent_deadline: Duration::from_secs(600),
            message_ttl: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::from_secs(5),
            claim_lease: Duration::from_secs(300),
            max_attempts: 10,
        }
    }
}

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register the replica: {0}")]
    Register(#[from] StoreError),
}

/// What request handlers share.
#[derive(Clone, Debug)]
pub(crate) struct HubState {
    pub(crate) replica_id: ReplicaId,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) metrics: Metrics,
    pub(crate) config: Arc<HubConfig>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) events: EventBus,
    /// Tracks control-channel sessions, which `axum::serve` does not wait for.
    pub(crate) sockets: TaskTracker,
    pub(crate) shutdown: CancellationToken,
}

/// Entry point: see [`Hub::start`].
#[derive(Debug)]
pub struct Hub;

impl Hub {
    /// Binds, registers this replica and starts serving in the background.
    /// The store must already be migrated.
    pub async fn start(config: HubConfig, store: Arc<dyn Store>) -> Result<RunningHub, StartError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let replica_id = ReplicaId::new();
        let advertise = config
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        store.register_replica(replica_id, &advertise).await?;
        let metrics = Metrics::new(store.backend());
        metrics.database_up.set(1);

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let config = Arc::new(config);
        let state = HubState {
            replica_id,
            store: store.clone(),
            metrics: metrics.clone(),
            config: config.clone(),
            sessions: Arc::new(Sessions::default()),
            events: EventBus::new(),
            sockets: TaskTracker::new(),
            shutdown: shutdown.clone(),
        };
        tasks.spawn(
            sweeper::Sweeper {
                store: store.clone(),
                events: state.events.clone(),
                metrics: metrics.clone(),
                interval: config.sweep_interval,
                policy: RequeuePolicy {
                    replica_stale_after: config.replica_stale_after,
                    lease: config.claim_lease,
                    max_attempts: config.max_attempts,
                },
                shutdown: shutdown.clone(),
            }
            .run(),
        );
        let app = router::router(state.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "HTTP server failed");
            }
            // Sockets close with 1001 (their tokens are children of the
            // shutdown token); deregister once they have released affinity.
            state.sockets.close();
            state.sockets.wait().await;
            match state.store.deregister_replica(replica_id).await {
                Ok(released) => tracing::info!(
                    replica = %replica_id,
                    released = released.len(),
                    "replica deregistered"
                ),
                Err(err) => tracing::warn!(%err, "could not deregister replica; it will be reaped"),
            }
        });
        tasks.spawn(replica::run_heartbeat(
            store,
            metrics,
            replica_id,
            advertise,
            config.replica_heartbeat_interval,
            shutdown.clone(),
        ));
        tasks.close();
        tracing::info!(replica = %replica_id, %addr, "hub replica serving");
        Ok(RunningHub {
            replica_id,
            addr,
            shutdown,
            tasks,
        })
    }
}

/// A started replica.
#[derive(Debug)]
pub struct RunningHub {
    replica_id: ReplicaId,
    addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl RunningHub {
    pub fn replica_id(&self) -> ReplicaId {
        self.replica_id
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A token that stops the replica when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops serving, deregisters the replica and waits for every task.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
    }

    /// Waits until the replica has stopped (after its token is cancelled).
    pub async fn stopped(self) {
        self.tasks.wait().await;
    }
}
