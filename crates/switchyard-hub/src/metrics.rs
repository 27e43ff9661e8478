//! Prometheus metrics of one hub replica.
//!
//! Each replica owns its own [`Registry`], so several hubs in one test
//! process never share counters.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use switchyard_store::DispatchIntent;

/// The metrics this replica exports on `GET /metrics`.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// 1 while the last database round trip succeeded.
    pub database_up: IntGauge,
    /// Successful replica heartbeats.
    pub replica_heartbeats: IntCounter,
    /// Times this replica found its registry row reaped and registered again.
    pub replica_reregistrations: IntCounter,
    /// Broker sessions on this replica.
    pub brokers_connected: IntGauge,
    /// Dispatches that reached `done` or `failed`, by op and state.
    pub dispatches_finished: IntCounterVec,
    /// Messages accepted by this replica's API.
    pub messages_accepted: IntCounter,
    /// Messages expired by this replica's sweeper.
    pub messages_expired: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric, labelled with the backend.
    pub fn new(backend: &str) -> Self {
        let registry = Registry::new_custom(Some("switchyard".into()), None)
            .expect("the prefix is a valid metric name");
        let info = IntGauge::with_opts(
            Opts::new("build_info", "Version and storage backend of this replica.")
                .const_label("version", env!("CARGO_PKG_VERSION"))
                .const_label("backend", backend),
        )
        .expect("valid metric");
        info.set(1);
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
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
            dispatches_finished: IntCounterVec::new(
                Opts::new(
                    "dispatches_finished_total",
                    "Dispatch intents that reached done or failed, recorded by this replica.",
                ),
                &["op", "state"],
            )
            .expect("valid metric"),
            messages_accepted: counter(
                "messages_accepted_total",
                "Messages accepted (committed) by this replica's API.",
            ),
            messages_expired: counter(
                "messages_expired_total",
                "Messages expired past their TTL by this replica's sweeper.",
            ),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(info),
            Box::new(metrics.database_up.clone()),
            Box::new(metrics.replica_heartbeats.clone()),
            Box::new(metrics.replica_reregistrations.clone()),
            Box::new(metrics.brokers_connected.clone()),
            Box::new(metrics.dispatches_finished.clone()),
            Box::new(metrics.messages_accepted.clone()),
            Box::new(metrics.messages_expired.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("each metric is registered once");
        }
        metrics
    }

    /// Counts a dispatch that just finished.
    pub fn observe_finished(&self, intent: &DispatchIntent) {
        self.dispatches_finished
            .with_label_values(&[intent.op.as_str(), intent.state.as_str()])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }
}
