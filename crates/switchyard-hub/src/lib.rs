#![doc = include_str!("../README.md")]

mod affinity;
mod api;
mod bus;
mod config;
mod event_log;
mod events;
mod http_routes;
mod idempotency;
mod lookup;
mod metrics;
mod originator;
mod replica;
mod server;
mod session;
mod state;
mod sweeper;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;
use switchyard_store::{Database, ReplicaId, RequeuePolicy, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api::error::ApiError;
pub use api::{random_secret, token_digest};
pub use config::HubConfig;
pub use metrics::Metrics;

use bus::Bus;
use bus::in_process::InProcessBus;
use event_log::EventLog;
use events::Events;
use originator::Originator;
use session::Registry;
use state::{HubState, Shared};

/// How long a stopping replica waits for its last events (the brokers it
/// released) to reach the event log.
const LOG_FLUSH_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

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
    #[error("invalid listener database URL: {0}")]
    ListenerUrl(String),
}

/// Entry point: see [`Hub::start`].
#[derive(Debug)]
pub struct Hub;

impl Hub {
    /// Binds, registers this replica and starts serving in the background.
    /// The database must already be migrated. On PostgreSQL the replica
    /// joins the command bus; on SQLite it runs alone.
    pub async fn start(config: HubConfig, database: Database) -> Result<RunningHub, StartError> {
        let store = database.clone().into_store();
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
        let registry = Arc::new(Registry::default());
        let events = Events::new(EventLog::start(
            store.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let bus: Arc<dyn Bus> = match &database {
            Database::Postgres(pool) => {
                let listen = match &config.listener_database_url {
                    Some(url) => url
                        .parse::<PgConnectOptions>()
                        .map_err(|e| StartError::ListenerUrl(e.to_string()))?,
                    None => (*pool.connect_options()).clone(),
                };
                Arc::new(bus::postgres::start(
                    bus::postgres::Setup {
                        pool: pool.clone(),
                        listen: listen.application_name("switchyard-listener"),
                        me: replica_id,
                        store: store.clone(),
                        registry: registry.clone(),
                        events: events.clone(),
                        metrics: metrics.clone(),
                        shutdown: shutdown.clone(),
                    },
                    &tasks,
                ))
            }
            Database::Sqlite(_) => Arc::new(InProcessBus::new(events.clone())),
        };
        let (originator, group_commit) = Originator::new(
            replica_id,
            store.clone(),
            registry.clone(),
            bus.clone(),
            events.clone(),
            metrics.clone(),
            config.clone(),
        );
        tasks.spawn(group_commit);
        let state: HubState = Arc::new(Shared {
            replica_id,
            store: store.clone(),
            metrics: metrics.clone(),
            config: config.clone(),
            registry,
            events,
            bus,
            originator,
            sockets: TaskTracker::new(),
            session_permits: Arc::new(tokio::sync::Semaphore::new(config.max_sessions)),
            upload_permits: Arc::new(tokio::sync::Semaphore::new(api::MAX_UPLOADS)),
            shutdown: shutdown.clone(),
        });
        tasks.spawn(
            sweeper::Sweeper {
                store: store.clone(),
                bus: state.bus.clone(),
                metrics: metrics.clone(),
                interval: config.sweep_interval,
                policy: RequeuePolicy {
                    replica_stale_after: config.replica_stale_after,
                    lease: config.claim_lease,
                    poll_lease: config.poll_lease,
                    max_attempts: config.max_attempts,
                },
                poll_lapse: config.poll_lapse(),
                retention: config.retention,
                event_retention: config.event_retention,
                shutdown: shutdown.clone(),
            }
            .run(),
        );
        let app = http_routes::router(state.clone());
        let stop = shutdown.clone();
        let limits = server::Limits {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
            shutdown_grace: config.shutdown_grace,
        };
        tasks.spawn(async move {
            server::serve(listener, app, limits, stop).await;
            // Sockets close with 1001 (their tokens are children of the
            // shutdown token); deregister once they have released affinity.
            state.sockets.close();
            state.sockets.wait().await;
            match state.store.deregister_replica(replica_id).await {
                Ok(released) => {
                    tracing::info!(
                        replica = %replica_id,
                        released = released.len(),
                        "replica deregistered"
                    );
                    for broker in released {
                        events::announce_broker(&*state.store, &*state.bus, broker, false).await;
                    }
                }
                Err(err) => tracing::warn!(%err, "could not deregister replica; it will be reaped"),
            }
            state.events.log().flush(LOG_FLUSH_GRACE).await;
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
