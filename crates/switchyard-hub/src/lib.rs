//! A Switchyard hub replica.
//!
//! [`Hub::start`] binds the HTTP listener, registers the replica in the
//! shared registry, starts its background tasks and serves until
//! [`RunningHub::shutdown`] (or the process's shutdown signal) stops it.
//! Tests start several hubs in one process this way.

mod api_error;
mod metrics;
mod replica;
mod router;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_store::{ReplicaId, Store, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api_error::ApiError;
pub use metrics::Metrics;

/// Settings of one replica.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address other replicas and operators see in the registry; defaults
    /// to `http://<bound address>`.
    pub advertise: Option<String>,
    /// How often the replica refreshes its registry row.
    pub heartbeat_interval: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            advertise: None,
            heartbeat_interval: Duration::from_secs(2),
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
        let state = HubState {
            replica_id,
            store: store.clone(),
            metrics: metrics.clone(),
        };
        tasks.spawn(replica::run_heartbeat(
            store,
            metrics,
            replica_id,
            advertise,
            config.heartbeat_interval,
            shutdown.clone(),
        ));
        let app = router::router(state);
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "HTTP server failed");
            }
        });
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
