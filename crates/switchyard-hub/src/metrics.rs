//! Prometheus metrics of one hub replica.
//!
//! Each replica owns its own [`Registry`], so several hubs in one test
//! process never share counters.

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use switchyard_store::DispatchIntent;

/// The metrics this replica exports on `GET /metrics`.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// 1 while the last database round trip succeeded.
    pub database_up: IntGauge,
    pub replica_heartbeats: IntCounter,
    pub replica_reregistrations: IntCounter,
    pub brokers_connected: IntGauge,
    /// Intents written by this replica's API, by op.
    pub intents_published: IntCounterVec,
    /// Intents claimed by this replica's drains, by op.
    pub intents_claimed: IntCounterVec,
    /// Intents that reached `done` or `failed`, by op and state.
    pub dispatches_finished: IntCounterVec,
    /// Seconds from an intent's creation to its outcome.
    pub intent_latency: Histogram,
    pub messages_accepted: IntCounter,
    pub messages_delivered: IntCounter,
    pub messages_expired: IntCounter,
    /// Work failed after `max_attempts` claims (dead letters), by kind
    /// (`message`, `dispatch`).
    pub dead_letters: IntCounterVec,
    /// Where this replica's API calls sent their work: local, forward, queued.
    pub routes: IntCounterVec,
    /// Seconds one drain pass (claim and send until empty) took.
    pub drain_duration: Histogram,
    pub notifications_sent: IntCounter,
    pub notifications_received: IntCounter,
    pub command_bus_reconnects: IntCounter,
    pub http_panics: IntCounter,
    /// Events this replica could not append to the event log (its queue
    /// was full, or the database refused the append for too long).
    pub events_dropped: IntCounter,
    /// Unfinished intents and messages older than five minutes (sweeper).
    pub stuck_work: IntGauge,
    /// Bytes of files sent with messages and not yet removed.
    pub attachment_bytes: IntGauge,
    /// Seconds from a message's acceptance to its broker's ack, observed
    /// by the replica that took the ack.
    pub accept_to_ack: Histogram,
    /// Unfinished messages and dispatches per broker (name), set by the
    /// replica running the sweeper.
    pub queue_depth: IntGaugeVec,
}

impl Metrics {
    /// Counts a claimed dispatch (or broker call) by its operation.
    pub(crate) fn count_claimed(&self, frame: &switchyard_proto::HubFrame) {
        let op = match frame {
            switchyard_proto::HubFrame::Dispatch(d) => d.op.as_str(),
            switchyard_proto::HubFrame::BrokerCall(_) => switchyard_proto::Op::Call.as_str(),
            _ => return,
        };
        self.intents_claimed.with_label_values(&[op]).inc();
    }

    /// Counts the dead letters of a requeue.
    pub(crate) fn observe_requeue(&self, report: &switchyard_store::RequeueReport) {
        self.dead_letters
            .with_label_values(&["message"])
            .inc_by(report.messages_failed);
        self.dead_letters
            .with_label_values(&["dispatch"])
            .inc_by(report.intents_failed);
    }

    /// Creates and registers every metric, labelled with the backend.
    pub fn new(backend: &str) -> Self {
        let registry = Registry::new_custom(Some("switchyard".into()), None)
            .expect("the prefix is a valid metric name");
        let register = |c: Box<dyn Collector>| {
            registry
                .register(c)
                .expect("each metric is registered once");
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str| {
            let buckets = vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ];
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            register(Box::new(h.clone()));
            h
        };
        let info = IntGauge::with_opts(
            Opts::new("build_info", "Version and storage backend of this replica.")
                .const_label("version", env!("CARGO_PKG_VERSION"))
                .const_label("backend", backend),
        )
        .expect("valid metric");
        info.set(1);
        register(Box::new(info));
        let metrics = Self {
            database_up: gauge(
                "database_up",
                "1 while the last database round trip of this replica succeeded.",
            ),
            replica_heartbeats: counter(
                "replica_heartbeats_total",
                "Registry heartbeats written by this replica.",
            ),
            replica_reregistrations: counter(
                "replica_reregistrations_total",
                "Times this replica was reaped as dead and registered again.",
            ),
            brokers_connected: gauge(
                "brokers_connected",
                "Broker control channels connected to this replica.",
            ),
            intents_published: counter_vec(
                "intents_published_total",
                "Dispatch intents written by this replica's API.",
                &["op"],
            ),
            intents_claimed: counter_vec(
                "intents_claimed_total",
                "Dispatch intents claimed by this replica's drains.",
                &["op"],
            ),
            dispatches_finished: counter_vec(
                "dispatches_finished_total",
                "Dispatch intents that reached done or failed, recorded by this replica.",
                &["op", "state"],
            ),
            intent_latency: histogram(
                "intent_to_done_seconds",
                "Time from a dispatch intent's creation to its outcome.",
            ),
            messages_accepted: counter(
                "messages_accepted_total",
                "Messages accepted (committed) by this replica's API.",
            ),
            messages_delivered: counter(
                "messages_delivered_total",
                "Messages acked by brokers connected to this replica.",
            ),
            messages_expired: counter(
                "messages_expired_total",
                "Messages expired past their TTL by this replica's sweeper.",
            ),
            dead_letters: counter_vec(
                "dead_letters_total",
                "Messages and dispatches failed by this replica after max_attempts claims.",
                &["kind"],
            ),
            routes: counter_vec(
                "routes_total",
                "Where API calls on this replica sent their work.",
                &["route"],
            ),
            drain_duration: histogram(
                "drain_duration_seconds",
                "Duration of one drain pass of one broker.",
            ),
            notifications_sent: counter(
                "notifications_sent_total",
                "NOTIFY payloads sent by this replica (after coalescing).",
            ),
            notifications_received: counter(
                "notifications_received_total",
                "Notifications received by this replica's listener.",
            ),
            http_panics: counter(
                "http_panics_total",
                "HTTP requests whose handler panicked (answered 500 `internal`).",
            ),
            events_dropped: counter(
                "events_dropped_total",
                "Events this replica could not append to the durable event log.",
            ),
            command_bus_reconnects: counter(
                "command_bus_reconnects_total",
                "Times the command bus listener lost and re-established its connection.",
            ),
            stuck_work: gauge(
                "stuck_work",
                "Unfinished intents and messages older than five minutes.",
            ),
            accept_to_ack: histogram(
                "message_accept_to_ack_seconds",
                "Time from a message's acceptance to its broker's ack.",
            ),
            queue_depth: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "queue_depth",
                        "Unfinished messages and dispatches per broker (set by the replica running the sweeper).",
                    ),
                    &["broker"],
                )
                .expect("valid metric");
                register(Box::new(g.clone()));
                g
            },
            attachment_bytes: gauge(
                "attachment_bytes",
                "Bytes of files sent with messages that storage still holds (until their message is final).",
            ),
            registry,
        };
        // Series with a known, closed set of labels exist from the start
        // (at 0), so dashboards and alerts see them before the first event.
        for kind in ["message", "dispatch"] {
            metrics.dead_letters.with_label_values(&[kind]);
        }
        for route in ["local", "forward", "queued"] {
            metrics.routes.with_label_values(&[route]);
        }
        metrics
    }

    /// Counts a dispatch that just finished.
    pub fn observe_finished(&self, intent: &DispatchIntent) {
        self.dispatches_finished
            .with_label_values(&[intent.op.as_str(), intent.state.as_str()])
            .inc();
        let latency = (intent.updated_at - intent.created_at).num_microseconds();
        if let Some(us) = latency {
            self.intent_latency.observe(us.max(0) as f64 / 1e6);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }
}
