//! The durable event log of `GET /v1/events`: every fact a replica
//! publishes is appended to the store's log ([`EventStore`]), and every
//! replica reads the log back in id order and fans it out to its SSE
//! clients. The log's id is the SSE `id:`, so a client reconnecting to any
//! replica, after any restart, resumes exactly after the last event it saw.
//!
//! Two tasks per replica:
//! - the writer takes what this replica publishes from a bounded queue
//!   ([`QUEUE`] events) and appends it in batches, after the commit of the
//!   fact it describes (invariant 6). A fact committed in the instant
//!   before its replica dies can miss the log; a full queue or a database
//!   that refuses appends for [`APPEND_ATTEMPTS`] tries drops events,
//!   counted in `switchyard_events_dropped_total`;
//! - the tailer reads what any replica appended, woken by this replica's
//!   appends, by the PostgreSQL notification each append sends at commit,
//!   and every [`BACKSTOP`], and broadcasts it here; while no client
//!   listens on this replica it reads nothing.
//!
//! A client starts at a position in the log (its `Last-Event-ID`, or the
//! log's end when it connects), reads the log from there until it has
//! caught up, and then takes the live fan-out, dropping by id what it
//! has: so the tailer may skip what went by while nobody listened.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::json;
use switchyard_store::{
    AgentId, LoggedEvent, MAX_EVENTS_PER_READ, MessageRef, MessageState, NewEvent, Store,
};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::events::HubEvent;
use crate::metrics::Metrics;

/// Events waiting to be appended, at most. Each is one row's JSON, which
/// the API bounds; a full queue drops (and counts) rather than blocks the
/// publisher, which has already committed.
const QUEUE: usize = 8192;
/// Most events appended in one transaction.
const BATCH: usize = 512;
/// After an append, the writer gathers for this long before the next:
/// one transaction (and one notification) per interval under load, at the
/// price of this much latency.
const GATHER: Duration = Duration::from_millis(20);
/// Tries of one append before its events are dropped.
const APPEND_ATTEMPTS: usize = 8;
/// The tailer reads the log at least this often while anyone listens, in
/// case a wake-up was lost.
const BACKSTOP: Duration = Duration::from_secs(1);
/// Events the live fan-out holds for a slow client before it lags (a
/// lagging client catches up from the log).
const FAN_OUT: usize = 4096;

enum Item {
    Event(NewEvent),
    /// Answered once everything queued before it is appended (or dropped).
    Flush(oneshot::Sender<()>),
}

/// One replica's handle on the event log. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct EventLog {
    queue: mpsc::Sender<Item>,
    live: broadcast::Sender<Arc<LoggedEvent>>,
    tail: Arc<Notify>,
    /// The lowest position a client subscribed from since the tailer last
    /// skipped ahead (`i64::MAX`: none): it never skips past it.
    floor: Arc<AtomicI64>,
    metrics: Metrics,
}

impl EventLog {
    /// Starts the writer and the tailer. The writer runs until every
    /// handle is gone (so a flush at shutdown still appends); the tailer
    /// stops with `shutdown`.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let (live, _) = broadcast::channel(FAN_OUT);
        let log = Self {
            queue,
            live,
            tail: Arc::new(Notify::new()),
            floor: Arc::new(AtomicI64::new(i64::MAX)),
            metrics,
        };
        tokio::spawn(write(
            store.clone(),
            rx,
            log.tail.clone(),
            log.metrics.clone(),
        ));
        tokio::spawn(log.clone().tail_loop(store, shutdown));
        log
    }

    /// Queues a committed fact for the log.
    pub(crate) fn record(&self, event: &HubEvent) {
        let entry = match encode(event) {
            Ok(entry) => entry,
            Err(err) => {
                tracing::warn!(%err, "cannot encode an event for the log");
                self.metrics.events_dropped.inc();
                return;
            }
        };
        if self.queue.try_send(Item::Event(entry)).is_err() {
            self.metrics.events_dropped.inc();
            tracing::warn!("event log queue full; an event was dropped");
        }
    }

    /// Waits (at most `limit`) until everything recorded so far is
    /// appended: at shutdown, after the last facts (brokers released).
    pub(crate) async fn flush(&self, limit: Duration) {
        let (done, wait) = oneshot::channel();
        if self.queue.send(Item::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(limit, wait).await;
        }
    }

    /// Live events, in id order, for a client that has read (or will read
    /// itself) the log up to id `start`: the fan-out goes on from no later
    /// than `start`, so the client's reading and the fan-out meet.
    pub(crate) fn subscribe_from(&self, start: i64) -> broadcast::Receiver<Arc<LoggedEvent>> {
        self.floor.fetch_min(start, Ordering::SeqCst);
        self.live.subscribe()
    }

    /// The log grew somewhere: read it now.
    pub(crate) fn wake(&self) {
        self.tail.notify_one();
    }

    async fn tail_loop(self, store: Arc<dyn Store>, shutdown: CancellationToken) {
        // Start at the log's end: live clients get what is appended from
        // now on; a resuming client reads the rest from the store.
        let mut backoff = retry_backoff();
        let mut cursor = loop {
            match store.event_bounds().await {
                Ok(bounds) => break bounds.last,
                Err(err) => {
                    tracing::warn!(%err, "cannot read the event log; retrying");
                    let delay = backoff.next().unwrap_or(BACKSTOP);
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        // Whether events went by unread while nobody listened here.
        let mut stale = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.tail.notified() => {}
                () = tokio::time::sleep(BACKSTOP) => {}
            }
            if self.live.receiver_count() == 0 {
                stale = true;
                continue;
            }
            if stale {
                // Skip what went by unheard, but not past where a client
                // subscribed from: it reads the log up to there itself.
                let floor = self.floor.swap(i64::MAX, Ordering::SeqCst);
                match store.event_bounds().await {
                    Ok(bounds) => cursor = cursor.max(bounds.last.min(floor)),
                    Err(err) => {
                        self.floor.fetch_min(floor, Ordering::SeqCst);
                        tracing::warn!(%err, "cannot read the event log");
                        continue;
                    }
                }
                stale = false;
            } else {
                // Reading without a gap: every client's start is behind.
                self.floor.store(i64::MAX, Ordering::SeqCst);
            }
            loop {
                let page = match store.events_after(cursor, MAX_EVENTS_PER_READ).await {
                    Ok(page) => page,
                    Err(err) => {
                        tracing::warn!(%err, "cannot read the event log");
                        break;
                    }
                };
                let full = page.len() == MAX_EVENTS_PER_READ as usize;
                for event in page {
                    cursor = event.id;
                    // Having no subscriber is normal.
                    let _ = self.live.send(Arc::new(event));
                }
                if !full {
                    break;
                }
            }
        }
    }
}

/// The writer: batches what is queued and appends it.
async fn write(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Item>,
    tail: Arc<Notify>,
    metrics: Metrics,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushes = Vec::new();
    let mut last_append: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        if let Some(at) = last_append {
            tokio::time::sleep_until(at + GATHER).await;
        }
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Item::Event(event) => batch.push(event),
                Item::Flush(done) => flushes.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            last_append = Some(tokio::time::Instant::now());
            append(&*store, &batch, &metrics).await;
            batch.clear();
            tail.notify_one();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn append(store: &dyn Store, batch: &[NewEvent], metrics: &Metrics) {
    let mut backoff = retry_backoff();
    for attempt in 1..=APPEND_ATTEMPTS {
        match store.append_events(batch).await {
            Ok(()) => return,
            Err(err) if attempt == APPEND_ATTEMPTS => {
                tracing::error!(%err, dropped = batch.len(), "cannot append to the event log; events dropped");
                metrics.events_dropped.inc_by(batch.len() as u64);
            }
            Err(err) => {
                tracing::warn!(%err, attempt, "cannot append to the event log; retrying");
                tokio::time::sleep(backoff.next().unwrap_or(BACKSTOP)).await;
            }
        }
    }
}

fn retry_backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_jitter()
        .without_max_times()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .build()
}

/// The log entry of a fact: its SSE event name, the agent it concerns and
/// its data. Written once, here, for every kind of event.
fn encode(event: &HubEvent) -> serde_json::Result<NewEvent> {
    let (kind, agent_id, data) = match event {
        HubEvent::AgentStatus(agent) => ("agent_status", Some(agent.id), json!({ "agent": agent })),
        HubEvent::DispatchFinished(dispatch) => (
            "dispatch_finished",
            dispatch.agent_id,
            json!({ "dispatch": dispatch }),
        ),
        HubEvent::BrokerOnline(broker) => ("broker_online", None, json!({ "broker": broker })),
        HubEvent::BrokerOffline(broker) => ("broker_offline", None, json!({ "broker": broker })),
        HubEvent::MessageDelivered(message) => message_event(message, MessageState::Delivered),
        HubEvent::MessageExpired(message) => message_event(message, MessageState::Expired),
        HubEvent::MessageFailed(message) => message_event(message, MessageState::Failed),
    };
    Ok(NewEvent {
        kind: kind.to_owned(),
        agent_id,
        data: serde_json::to_string(&data)?,
    })
}

/// A message's event names it and its final state; its body and error
/// are one `GET /v1/messages/{id}` away, which keeps the log small on the
/// busiest path (one event per delivered message).
fn message_event(
    message: &MessageRef,
    state: MessageState,
) -> (&'static str, Option<AgentId>, serde_json::Value) {
    let kind = match state {
        MessageState::Delivered => "message_delivered",
        MessageState::Expired => "message_expired",
        _ => "message_failed",
    };
    let data = json!({ "message": {
        "id": message.id,
        "agent_id": message.agent_id,
        "broker_id": message.broker_id,
        "state": state,
    }});
    (kind, Some(message.agent_id), data)
}
