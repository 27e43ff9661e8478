//! The drains of this replica's sessions: the index that wakes them
//! ([`Registry`], by broker) and the loop each one runs ([`Drain`]).
//!
//! The owner replica claims a broker's pending work and sends it down the
//! broker's socket. One drain loop runs per local session, so a broker's
//! work is sent by one task, in claim order, which is per-agent sequence
//! order. It runs when the session starts, whenever it is woken (new work
//! was written for the broker: [`Registry::wake`]), and on a periodic
//! backstop, so a missed wake-up delays work by at most one backstop
//! interval and never loses it.
//!
//! The registry is a local index, not the truth: affinity in storage says
//! which session is live. A replica keeps at most one session per broker
//! here; a newer local session of the same broker replaces (and closes) the
//! older.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use switchyard_proto::{AgentMessage, AgentSpec, BrokerCall, Dispatch, HubFrame};
use switchyard_store::{AgentId, BrokerId, ReplicaId, SessionId, Store, StoreError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::close::Close;
use super::writer::{Outbox, WriteError};
use crate::metrics::Metrics;

/// Handle on one live session of this replica.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    pub(crate) session_id: SessionId,
    pub(crate) outbox: Outbox,
    /// Wakes the session's drain: there is new work for the broker.
    pub(crate) wake: Arc<Notify>,
    /// Cancelled when the session ends, for whatever reason.
    pub(crate) cancel: CancellationToken,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_broker: Mutex<HashMap<BrokerId, SessionHandle>>,
}

impl Registry {
    fn map(&self) -> MutexGuard<'_, HashMap<BrokerId, SessionHandle>> {
        // The map holds no invariant a thread panicking with the lock could break halfway.
        self.by_broker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session, closing the older local session it replaces.
    pub(crate) fn insert(&self, broker: BrokerId, handle: SessionHandle) {
        let older = self.map().insert(broker, handle);
        if let Some(old) = older {
            old.outbox.close(Close::superseded());
        }
    }

    /// Forgets the session, if it is still the registered one.
    pub(crate) fn remove(&self, broker: BrokerId, session: SessionId) {
        let mut map = self.map();
        if map.get(&broker).is_some_and(|h| h.session_id == session) {
            map.remove(&broker);
        }
    }

    /// Wakes the drain of the broker's local session. False if there is none.
    pub(crate) fn wake(&self, broker: BrokerId) -> bool {
        match self.map().get(&broker) {
            Some(handle) => {
                handle.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Wakes every local session's drain (after the listener reconnects).
    pub(crate) fn wake_all(&self) {
        for handle in self.map().values() {
            handle.wake.notify_one();
        }
    }
}

/// Rows claimed per round trip.
const BATCH: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DrainError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

pub(crate) struct Drain {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) replica: ReplicaId,
    pub(crate) broker: BrokerId,
    pub(crate) session: SessionId,
    pub(crate) outbox: Outbox,
    pub(crate) wake: Arc<Notify>,
    pub(crate) backstop: Duration,
    pub(crate) cancel: CancellationToken,
    pub(crate) metrics: Metrics,
}

impl Drain {
    pub(crate) async fn run(self) {
        loop {
            let timer = self.metrics.drain_duration.start_timer();
            let drained = self.drain_once().await;
            timer.observe_duration();
            match drained {
                Ok(()) => {}
                Err(DrainError::Write(WriteError::WriterGone)) => return,
                Err(DrainError::Store(err)) => {
                    tracing::warn!(broker = %self.broker, %err, "drain failed; retrying");
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.backstop) => {}
            }
        }
    }

    /// Claims and sends until the broker has no pending work left.
    async fn drain_once(&self) -> Result<(), DrainError> {
        let mut specs: HashMap<AgentId, AgentSpec> = HashMap::new();
        let session = [(self.broker, self.session)];
        // Broker calls are claimed on the first pass of each drain only:
        // they are rare, and a probe on every pass of a long drain cost
        // message throughput. More than a batch of them waits for the next
        // wake-up or backstop.
        let mut first_pass = true;
        loop {
            // Both claims at once, on two connections: a pass costs one
            // round trip of waiting instead of two. Intents still go out
            // before the messages claimed with them. What one claim got is
            // sent even if the other failed: a claimed row left unsent
            // would wait in flight until its lease ran out.
            // Broker calls (no agent, no order to keep) ride along.
            let (intents, messages, calls) = tokio::join!(
                self.store.claim_intents(&session, self.replica, BATCH),
                self.store.claim_messages(&session, self.replica, BATCH),
                async {
                    if first_pass {
                        self.store
                            .claim_broker_calls(self.broker, self.session, self.replica, BATCH)
                            .await
                    } else {
                        Ok(Vec::new())
                    }
                },
            );
            first_pass = false;
            let (intents, intents_failed) = claimed(intents);
            let (messages, messages_failed) = claimed(messages);
            let (calls, calls_failed) = claimed(calls);
            let mut failed = intents_failed.or(messages_failed).or(calls_failed);
            for intent in intents.iter().chain(&calls) {
                self.metrics
                    .intents_claimed
                    .with_label_values(&[intent.op.as_str()])
                    .inc();
                let Some(agent_id) = intent.agent_id else {
                    self.send(HubFrame::BrokerCall(BrokerCall {
                        id: intent.id.0,
                        name: intent.name.clone().unwrap_or_default(),
                        args: intent.args.0.clone(),
                    }))
                    .await?;
                    continue;
                };
                let agent = match specs.get(&agent_id) {
                    Some(spec) => spec.clone(),
                    None => match self.store.agent(agent_id).await {
                        Ok(row) => {
                            let spec = AgentSpec {
                                name: row.name,
                                command: row.command.0,
                                env: row.env.0,
                            };
                            specs.insert(agent_id, spec.clone());
                            spec
                        }
                        Err(err) => {
                            failed = failed.or(Some(err));
                            break;
                        }
                    },
                };
                self.send(HubFrame::Dispatch(Dispatch {
                    id: intent.id.0,
                    agent_id: agent_id.0,
                    op: intent.op,
                    name: intent.name.clone(),
                    agent,
                    args: intent.args.0.clone(),
                }))
                .await?;
            }
            for message in &messages {
                self.send(HubFrame::Message(AgentMessage {
                    id: message.id.0,
                    agent_id: message.agent_id.0,
                    seq: message.seq,
                    body: message.body.0.clone(),
                }))
                .await?;
            }
            if let Some(err) = failed {
                return Err(err.into());
            }
            if intents.len() < BATCH as usize && messages.len() < BATCH as usize {
                return Ok(());
            }
        }
    }

    async fn send(&self, frame: HubFrame) -> Result<(), DrainError> {
        Ok(self.outbox.send(frame).await?)
    }
}

/// Splits a claim's outcome into the rows it got (none on failure) and its
/// error.
fn claimed<T>(outcome: Result<Vec<T>, StoreError>) -> (Vec<T>, Option<StoreError>) {
    match outcome {
        Ok(rows) => (rows, None),
        Err(err) => (Vec::new(), Some(err)),
    }
}
