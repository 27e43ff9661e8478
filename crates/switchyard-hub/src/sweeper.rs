//! The sweeper: cluster-wide housekeeping, run by one replica at a time.
//!
//! Every replica runs this loop, but only the replica that holds the
//! singleton role (a PostgreSQL advisory lock; always this replica on
//! SQLite) does the work: reap replicas whose heartbeat is stale and release their brokers'
//! affinities; end poll sessions that stopped polling; return claimed work
//! whose claimer died or whose lease ran out (failing it after max
//! attempts); fail intents past their deadline and
//! expire messages past their TTL (and remove the files of final
//! messages); prune old finished rows; and measure
//! stuck work. Each step is a guarded UPDATE, so even two sweepers at once
//! (e.g. while a lock changes hands) would do no harm.

use std::sync::Arc;
use std::time::Duration;

use switchyard_store::{IntentState, RequeuePolicy, Store, StoreResult};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::events::{self, HubEvent};
use crate::metrics::Metrics;

/// Unfinished work older than this counts as stuck.
const STUCK_AFTER: Duration = Duration::from_secs(300);

pub(crate) struct Sweeper {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) metrics: Metrics,
    pub(crate) interval: Duration,
    pub(crate) policy: RequeuePolicy,
    pub(crate) retention: Duration,
    /// How long the event log keeps events for clients that resume.
    pub(crate) event_retention: Duration,
    /// Poll sessions silent this long have lapsed.
    pub(crate) poll_lapse: Duration,
    pub(crate) shutdown: CancellationToken,
}

impl Sweeper {
    pub(crate) async fn run(self) {
        let mut role = self.store.singleton();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading = false;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match role.hold().await {
                Ok(true) => {
                    if !leading {
                        tracing::info!("this replica runs the sweeper");
                    }
                    leading = true;
                    if let Err(err) = self.sweep().await {
                        tracing::warn!(%err, "sweep failed; retrying next interval");
                    }
                }
                Ok(false) => leading = false,
                Err(err) => {
                    leading = false;
                    tracing::warn!(%err, "cannot take the sweeper role; retrying");
                    role = self.store.singleton();
                }
            }
        }
    }

    async fn sweep(&self) -> StoreResult<()> {
        let reaped = self
            .store
            .reap_dead_replicas(self.policy.replica_stale_after)
            .await?;
        for replica in &reaped {
            tracing::warn!(%replica, "reaped a dead replica and released its brokers");
        }
        for broker in self.store.release_lapsed_sessions(self.poll_lapse).await? {
            tracing::info!(%broker, "poll session lapsed: the broker stopped polling");
            events::announce_broker(&*self.store, &*self.bus, broker, false).await;
        }
        let report = self.store.requeue_abandoned(self.policy).await?;
        if report != Default::default() {
            tracing::info!(?report, "requeued abandoned work");
        }
        self.metrics.observe_requeue(&report);
        events::publish_dead_letters(&*self.store, &*self.bus, &report).await;
        for id in self.store.expire_intents().await? {
            let row = self.store.intent(id).await?;
            if row.state == IntentState::Failed {
                self.metrics.observe_finished(&row);
                self.bus.publish(HubEvent::DispatchFinished(row));
            }
        }
        let expired = self.store.expire_messages().await?;
        self.metrics.messages_expired.inc_by(expired.len() as u64);
        for message in expired {
            self.bus.publish(HubEvent::MessageExpired(message));
        }
        self.store.prune_events(self.event_retention).await?;
        let removed = self.store.remove_finished_attachments().await?;
        if removed > 0 {
            tracing::debug!(removed, "removed the files of final messages");
        }
        self.metrics
            .attachment_bytes
            .set(self.store.attachment_bytes().await?);
        self.store.prune_finished(self.retention).await?;
        let stuck = self.store.count_stuck(STUCK_AFTER).await?;
        self.metrics.stuck_work.set(stuck as i64);
        let depths = self.store.queue_depths().await?;
        self.metrics.queue_depth.reset();
        for (broker, depth) in depths {
            self.metrics
                .queue_depth
                .with_label_values(&[broker.as_str()])
                .set(depth);
        }
        Ok(())
    }
}
