//! The command bus on PostgreSQL: LISTEN/NOTIFY, used only as a wake-up.
//!
//! Two channels carry ids, never bodies (a third, the store's
//! `switchyard_event_log`, only says the event log grew):
//! - `switchyard_wake`: "these brokers, whose sessions replica r owns, have
//!   new work";
//! - `switchyard_event`: "these dispatches finished / these agents changed
//!   phase" (committed facts), so a caller waiting on another replica
//!   learns the outcome.
//!
//! Three parts in this one file, so the payload format is written once next
//! to both ends that use it: the codec ([`WakePayload`], [`EventPayload`],
//! [`decode`]); the sending half ([`PostgresBus`] and its send loop: queue,
//! coalesce, encode, NOTIFY); the listening half ([`Listener`]: LISTEN on a
//! dedicated connection, decode, wake the local drain).
//!
//! Sending is coalesced because a NOTIFY takes a cluster-wide lock at
//! commit: the queue is emptied into one statement with at most one payload
//! per target replica (and per [`IDS_PER_PAYLOAD`] ids); message wake-ups
//! are further debounced to one NOTIFY per [`DEBOUNCE`] under load, while
//! lifecycle wake-ups and events, which a caller waits for, go at once.
//!
//! After every listener (re)connect the order is: LISTEN (committed), then
//! wake every local session's drain, then wait for notifications, so
//! nothing sent while the listener was down stays stranded (invariant 5).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPoolOptions};
use switchyard_store::{AgentId, BrokerId, EVENT_LOG_CHANNEL, IntentId, ReplicaId, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::events::{Events, HubEvent};
use crate::metrics::Metrics;
use crate::session::Registry;

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

pub(crate) const WAKE_CHANNEL: &str = "switchyard_wake";
pub(crate) const EVENT_CHANNEL: &str = "switchyard_event";

/// Ids per notification: keeps every payload far below PostgreSQL's
/// 8000-byte limit (a UUID takes 39 bytes in JSON).
const IDS_PER_PAYLOAD: usize = 150;
/// Most queued items folded into one NOTIFY transaction.
const MAX_BATCH: usize = 8192;
/// After a NOTIFY, a non-urgent one waits until this much time has passed,
/// gathering whatever queues up meanwhile. An idle replica's first wake-up
/// goes out at once; under load message wake-ups cost at most one NOTIFY
/// per interval.
const DEBOUNCE: Duration = Duration::from_millis(5);

/// Payload on [`WAKE_CHANNEL`]: `{"r": replica, "b": [broker, ...]}`, "these
/// brokers, whose sessions replica r owns, have new work".
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WakePayload {
    pub(crate) r: ReplicaId,
    pub(crate) b: Vec<BrokerId>,
}

/// Payload on [`EVENT_CHANNEL`]: `{"o": origin, "d": [dispatch, ...], "a":
/// [agent, ...]}`, "these dispatches finished / these agents changed
/// phase", committed on replica o.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct EventPayload {
    pub(crate) o: ReplicaId,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) d: Vec<IntentId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) a: Vec<AgentId>,
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("payloads serialize")
}

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
    /// The event log grew (sent by the store at each append's commit).
    Logged,
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
        EVENT_LOG_CHANNEL => Ok(Notice::Logged),
        other => Err(DecodeError::Channel(other.to_owned())),
    }
}

#[derive(Debug)]
enum Outgoing {
    Wake {
        replica: ReplicaId,
        broker: BrokerId,
        urgent: bool,
    },
    Dispatch(IntentId),
    Agent(AgentId),
}

impl Outgoing {
    /// Someone is waiting on it: send without the debounce delay.
    fn is_urgent(&self) -> bool {
        match self {
            Outgoing::Wake { urgent, .. } => *urgent,
            Outgoing::Dispatch(_) | Outgoing::Agent(_) => true,
        }
    }
}

/// The bus of a replica on PostgreSQL. Queuing never blocks; the send loop
/// does the NOTIFYs.
#[derive(Debug)]
pub(crate) struct PostgresBus {
    queue: mpsc::UnboundedSender<Outgoing>,
    events: Events,
    /// Set by the listener while it is connected.
    listening: Arc<AtomicBool>,
}

impl PostgresBus {
    /// The bus and its send loop, which runs until `shutdown`.
    pub(crate) fn new(
        pool: PgPool,
        me: ReplicaId,
        events: Events,
        listening: Arc<AtomicBool>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> (Self, impl Future<Output = ()>) {
        let (queue, rx) = mpsc::unbounded_channel();
        let bus = Self {
            queue,
            events,
            listening,
        };
        (bus, send_loop(pool, me, rx, metrics, shutdown))
    }
}

impl Bus for PostgresBus {
    fn wake(&self, owner: ReplicaId, broker: BrokerId, urgent: bool) -> bool {
        let _ = self.queue.send(Outgoing::Wake {
            replica: owner,
            broker,
            urgent,
        });
        true
    }

    fn publish(&self, event: HubEvent) {
        // Waiters on other replicas need only lifecycle outcomes; every
        // event reaches other replicas' SSE clients through the log.
        let item = match &event {
            HubEvent::DispatchFinished(row) => Some(Outgoing::Dispatch(row.id)),
            HubEvent::AgentStatus(row) => Some(Outgoing::Agent(row.id)),
            _ => None,
        };
        if let Some(item) = item {
            let _ = self.queue.send(item);
        }
        self.events.publish_committed(event);
    }

    fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }
}

async fn send_loop(
    pool: PgPool,
    me: ReplicaId,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            first = rx.recv() => match first {
                Some(first) => first,
                None => return,
            },
        };
        let mut batch = vec![first];
        // Debounce non-urgent wake-ups that follow a recent NOTIFY, unless
        // something urgent arrives meanwhile.
        if let Some(at) = last_sent
            && !batch[0].is_urgent()
        {
            let until = at + DEBOUNCE;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    item = rx.recv() => match item {
                        Some(item) => {
                            let urgent = item.is_urgent();
                            batch.push(item);
                            if urgent {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        }
        // Everything else that queued up goes out together.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let (channels, payloads) = payloads(me, batch);
        let sent =
            sqlx::query("SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)")
                .bind(&channels)
                .bind(&payloads)
                .execute(&pool)
                .await;
        last_sent = Some(tokio::time::Instant::now());
        match sent {
            Ok(_) => metrics.notifications_sent.inc_by(payloads.len() as u64),
            Err(err) => tracing::warn!(%err, "NOTIFY failed; the drain backstop covers it"),
        }
    }
}

/// Folds queued items into (channel, payload) pairs: one wake per target
/// replica and one event payload, each split every [`IDS_PER_PAYLOAD`] ids.
fn payloads(me: ReplicaId, batch: Vec<Outgoing>) -> (Vec<&'static str>, Vec<String>) {
    let mut wakes: BTreeMap<ReplicaId, BTreeSet<BrokerId>> = BTreeMap::new();
    let mut dispatches = BTreeSet::new();
    let mut agents = BTreeSet::new();
    for item in batch {
        match item {
            Outgoing::Wake {
                replica, broker, ..
            } => {
                wakes.entry(replica).or_default().insert(broker);
            }
            Outgoing::Dispatch(id) => {
                dispatches.insert(id);
            }
            Outgoing::Agent(id) => {
                agents.insert(id);
            }
        }
    }
    let mut channels = Vec::new();
    let mut payloads = Vec::new();
    for (replica, brokers) in wakes {
        let brokers: Vec<BrokerId> = brokers.into_iter().collect();
        for chunk in brokers.chunks(IDS_PER_PAYLOAD) {
            channels.push(WAKE_CHANNEL);
            payloads.push(json(&WakePayload {
                r: replica,
                b: chunk.to_vec(),
            }));
        }
    }
    let dispatches: Vec<IntentId> = dispatches.into_iter().collect();
    for chunk in dispatches.chunks(IDS_PER_PAYLOAD) {
        channels.push(EVENT_CHANNEL);
        payloads.push(json(&EventPayload {
            o: me,
            d: chunk.to_vec(),
            ..Default::default()
        }));
    }
    let agents: Vec<AgentId> = agents.into_iter().collect();
    for chunk in agents.chunks(IDS_PER_PAYLOAD) {
        channels.push(EVENT_CHANNEL);
        payloads.push(json(&EventPayload {
            o: me,
            a: chunk.to_vec(),
            ..Default::default()
        }));
    }
    (channels, payloads)
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
        listener
            .listen_all([WAKE_CHANNEL, EVENT_CHANNEL, EVENT_LOG_CHANNEL])
            .await?;
        Ok(listener)
    }

    fn after_connect(&self) {
        self.listening.store(true, Ordering::Relaxed);
        self.registry.wake_all();
        self.events.log().wake();
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
            Ok(Notice::Logged) => self.events.log().wake(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_ups_are_coalesced_per_replica_and_payloads_stay_small() {
        let me = ReplicaId::new();
        let (a, b) = (ReplicaId::new(), ReplicaId::new());
        let broker = BrokerId::new();
        let mut batch = Vec::new();
        for _ in 0..1000 {
            batch.push(Outgoing::Wake {
                replica: a,
                broker,
                urgent: false,
            });
        }
        for _ in 0..400 {
            batch.push(Outgoing::Wake {
                replica: b,
                broker: BrokerId::new(),
                urgent: false,
            });
        }
        for _ in 0..10 {
            batch.push(Outgoing::Dispatch(IntentId::new()));
        }
        let (channels, payloads) = payloads(me, batch);
        // a: one payload; b: 400 brokers in 3 chunks; one event payload.
        assert_eq!(channels.iter().filter(|c| **c == WAKE_CHANNEL).count(), 4);
        assert_eq!(channels.iter().filter(|c| **c == EVENT_CHANNEL).count(), 1);
        assert!(payloads.iter().all(|p| p.len() < 8000), "NOTIFY limit");
    }
}
