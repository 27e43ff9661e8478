//! Settings of one replica.

use std::net::SocketAddr;
use std::time::Duration;

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
    /// Work a poll returned that the broker has not acknowledged after this
    /// long is sent again (and counts as an attempt).
    pub poll_lease: Duration,
    /// Longest a poll waits for work before it answers with none.
    pub poll_max_wait: Duration,
    /// Bytes the files sent with one message may add up to.
    pub max_attachment_bytes: u64,
    /// Files one message may carry.
    pub max_attachments: usize,
    /// Claims after which abandoned work fails instead of being requeued.
    pub max_attempts: i32,
    /// PostgreSQL only: where the command bus listener connects, when the
    /// main URL goes through a transaction-pooling PgBouncer (which cannot
    /// carry LISTEN). Defaults to the main database URL.
    pub listener_database_url: Option<String>,
    /// Finished intents and messages older than this are deleted.
    pub retention: Duration,
    /// Events older than this leave the event log: a client resuming from
    /// before them is told it missed some (`recovered: false`).
    pub event_retention: Duration,
    /// Longest one write to a broker's socket may take. A broker that stops
    /// reading for this long is disconnected; what it had claimed goes back
    /// to `pending` when its next session starts.
    pub write_timeout: Duration,
    /// HTTP connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Broker sessions this replica holds at once; the upgrade of one more
    /// answers 503, so the broker tries another replica.
    pub max_sessions: usize,
    /// How long a connection may take to send a request's headers, and may
    /// stay idle between requests, before it is closed.
    pub header_read_timeout: Duration,
    /// How long shutdown waits for HTTP requests in progress.
    pub shutdown_grace: Duration,
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
            poll_lease: Duration::from_secs(30),
            poll_max_wait: Duration::from_secs(20),
            max_attachment_bytes: 64 << 20,
            max_attachments: 16,
            max_attempts: 10,
            listener_database_url: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            event_retention: Duration::from_secs(24 * 3600),
            write_timeout: Duration::from_secs(30),
            max_connections: 8192,
            max_sessions: 4096,
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl HubConfig {
    /// A poll session with no poll or report for this long has lapsed
    /// (the broker went away): three heartbeat intervals, the silence
    /// after which a socket is closed. A waiting poll heartbeats every
    /// interval.
    pub fn poll_lapse(&self) -> Duration {
        self.heartbeat_interval.saturating_mul(3)
    }
}
