#![doc = include_str!("../README.md")]

mod api;
mod api_error;
mod auth;
mod command_bus;
mod control;
mod drain;
mod events;
mod group_commit;
mod lookup;
mod metrics;
mod replica;
mod router;
mod routing;
mod sessions;
mod sweeper;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use switchyard_store::{Database, ReplicaId, RequeuePolicy, Store, StoreError};
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
    /// PostgreSQL only: where the command bus listener connects, when the
    /// main URL goes through a transaction-pooling PgBouncer (which cannot
    /// carry LISTEN). Defaults to the main database URL.
    pub listener_database_url: Option<String>,
    /// Finished intents and messages older than this are deleted.
    pub retention: Duration,
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
            listener_database_url: None,
            retention: Duration::from_secs(7 * 24 * 3600),
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
    #[error("invalid listener database URL: {0}")]
    ListenerUrl(String),
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
    /// The command bus sender (PostgreSQL only).
    pub(crate) notifier: Option<command_bus::Notifier>,
    /// Whether the command bus listener is connected (PostgreSQL only).
    pub(crate) listener: Option<command_bus::ListenerHealth>,
    /// Group-committing writer of single messages.
    pub(crate) messages: group_commit::MessageWriter,
    /// Admin tokens verified lately.
    pub(crate) tokens: Arc<auth::TokenCache>,
    pub(crate) shutdown: CancellationToken,
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
        let sessions = Arc::new(Sessions::default());
        let (notifier, listen_options) = match &database {
            Database::Postgres(pool) => {
                let (notifier, sender) = command_bus::notifier(
                    pool.clone(),
                    replica_id,
                    metrics.clone(),
                    shutdown.clone(),
                );
                tasks.spawn(sender);
                let options = match &config.listener_database_url {
                    Some(url) => url
                        .parse::<PgConnectOptions>()
                        .map_err(|e| StartError::ListenerUrl(e.to_string()))?,
                    None => (*pool.connect_options()).clone(),
                };
                (
                    Some(notifier),
                    Some(options.application_name("switchyard-listener")),
                )
            }
            Database::Sqlite(_) => (None, None),
        };
        let events = EventBus::new(notifier.clone());
        let listener_health = listen_options
            .as_ref()
            .map(|_| command_bus::ListenerHealth::default());
        if let (Some(options), Some(health)) = (listen_options, &listener_health) {
            tasks.spawn(
                command_bus::Listener {
                    options,
                    me: replica_id,
                    store: store.clone(),
                    sessions: sessions.clone(),
                    events: events.clone(),
                    metrics: metrics.clone(),
                    health: health.clone(),
                    shutdown: shutdown.clone(),
                }
                .run(),
            );
        }
        let (messages, writer) = group_commit::MessageWriter::start(store.clone());
        tasks.spawn(writer);
        let state = HubState {
            replica_id,
            store: store.clone(),
            metrics: metrics.clone(),
            config: config.clone(),
            sessions,
            events,
            sockets: TaskTracker::new(),
            shutdown: shutdown.clone(),
            notifier,
            listener: listener_health,
            messages,
            tokens: Arc::default(),
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
                retention: config.retention,
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
