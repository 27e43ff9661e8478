//! Periodic housekeeping of a replica: fail intents past their deadline,
//! expire messages past their TTL, and return claimed work whose claimer
//! died or whose lease ran out. Every step is an idempotent guarded UPDATE,
//! so replicas running it at the same time do no harm.

use std::sync::Arc;
use std::time::Duration;

use switchyard_store::{IntentState, RequeuePolicy, Store, StoreResult};
use tokio_util::sync::CancellationToken;

use crate::events::{EventBus, HubEvent};
use crate::metrics::Metrics;

pub(crate) struct Sweeper {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) events: EventBus,
    pub(crate) metrics: Metrics,
    pub(crate) interval: Duration,
    pub(crate) policy: RequeuePolicy,
    pub(crate) shutdown: CancellationToken,
}

impl Sweeper {
    pub(crate) async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(err) = self.sweep().await {
                tracing::warn!(%err, "sweep failed; retrying next interval");
            }
        }
    }

    async fn sweep(&self) -> StoreResult<()> {
        for id in self.store.expire_intents().await? {
            let row = self.store.intent(id).await?;
            if row.state == IntentState::Failed {
                self.metrics.observe_finished(&row);
                self.events.publish(HubEvent::DispatchFinished(row));
            }
        }
        let expired = self.store.expire_messages().await?;
        self.metrics.messages_expired.inc_by(expired.len() as u64);
        let report = self.store.requeue_abandoned(self.policy).await?;
        if report != Default::default() {
            tracing::info!(?report, "requeued abandoned work");
        }
        Ok(())
    }
}
