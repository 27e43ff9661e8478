//! Prometheus metrics of one hub replica.
//!
//! Each replica owns its own [`Registry`], so several hubs in one test
//! process never share counters.

use prometheus::{IntCounter, IntGauge, Opts, Registry, TextEncoder};

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
        let database_up = IntGauge::new(
            "database_up",
            "1 while the last database round trip of this replica succeeded.",
        )
        .expect("valid metric");
        let replica_heartbeats = IntCounter::new(
            "replica_heartbeats_total",
            "Registry heartbeats written by this replica.",
        )
        .expect("valid metric");
        let replica_reregistrations = IntCounter::new(
            "replica_reregistrations_total",
            "Times this replica was reaped as dead and registered again.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(info) as Box<dyn prometheus::core::Collector>,
            Box::new(database_up.clone()),
            Box::new(replica_heartbeats.clone()),
            Box::new(replica_reregistrations.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        Self {
            registry,
            database_up,
            replica_heartbeats,
            replica_reregistrations,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }
}
