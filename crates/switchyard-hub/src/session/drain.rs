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

use switchyard_proto::{AgentMessage, AgentSpec, AttachmentRef, BrokerCall, Dispatch, HubFrame};
use switchyard_store::{
    AgentId, BrokerId, IntentId, MessageId, ReplicaId, SessionId, Store, StoreError,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::close::Close;
use super::writer::{Outbox, WriteError};
use crate::metrics::Metrics;

/// Handle on one live session of this replica: a socket, or a poll that
/// is waiting for work.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    pub(crate) session_id: SessionId,
    /// The socket's outbox; `None` for a waiting poll.
    pub(crate) outbox: Option<Outbox>,
    /// Wakes the session's drain (or waiting poll): there is new work for
    /// the broker.
    pub(crate) wake: Arc<Notify>,
    /// Cancelled when the session ends (or the poll is replaced).
    pub(crate) cancel: CancellationToken,
}

impl SessionHandle {
    /// Ends this local session because a newer one of its broker took
    /// over: a socket is told why and closed; a waiting poll answers.
    fn supersede(&self) {
        match &self.outbox {
            Some(outbox) => outbox.close(Close::superseded()),
            None => self.cancel.cancel(),
        }
    }
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

    /// Registers a session, closing the older local session (or waiting
    /// poll) it replaces.
    pub(crate) fn insert(&self, broker: BrokerId, handle: SessionHandle) {
        let older = self.map().insert(broker, handle);
        if let Some(old) = older {
            old.supersede();
        }
    }

    /// Registers a waiting poll, unless another session of its broker is
    /// registered here: a poll never closes a socket, which may belong to
    /// a session newer than the one the poll checked a moment ago. An
    /// unregistered poll still claims on every backstop interval.
    pub(crate) fn insert_poll(&self, broker: BrokerId, handle: SessionHandle) {
        let mut map = self.map();
        match map.get(&broker) {
            Some(other) if other.session_id != handle.session_id => {}
            _ => {
                if let Some(old) = map.insert(broker, handle) {
                    old.supersede();
                }
            }
        }
    }

    /// Closes the broker's local session if it is not `session`: a newer
    /// session was claimed here without registering (a poll session's
    /// hello).
    pub(crate) fn supersede_others(&self, broker: BrokerId, session: SessionId) {
        let mut map = self.map();
        if map.get(&broker).is_some_and(|h| h.session_id != session)
            && let Some(old) = map.remove(&broker)
        {
            old.supersede();
        }
    }

    /// Forgets the session (or poll) `handle`, if it is still the
    /// registered one.
    pub(crate) fn remove(&self, broker: BrokerId, handle: &SessionHandle) {
        let mut map = self.map();
        if map
            .get(&broker)
            .is_some_and(|h| Arc::ptr_eq(&h.wake, &handle.wake))
        {
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
        let mut claimer = Claimer::new(self.store.clone(), self.replica, self.broker, self.session);
        // Broker calls are claimed on the first pass of each drain only:
        // they are rare, and a probe on every pass of a long drain cost
        // message throughput. More than a batch of them waits for the next
        // wake-up or backstop.
        let mut first_pass = true;
        loop {
            let pass = claimer.pass(BATCH, first_pass).await;
            first_pass = false;
            claimer.unclaim(&pass.unsent).await;
            for (frame, _) in pass.frames {
                self.metrics.count_claimed(&frame);
                self.outbox.send(frame).await?;
            }
            if let Some(err) = pass.failed {
                return Err(err.into());
            }
            if !pass.more {
                return Ok(());
            }
        }
    }
}

/// Which row a frame sends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WorkId {
    Intent(IntentId),
    Message(MessageId),
}

/// What one pass of a [`Claimer`] got.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    /// The frames to send, in order: intents (and broker calls) first, then
    /// messages, each in (agent, seq) order.
    pub(crate) frames: Vec<(HubFrame, WorkId)>,
    /// Rows claimed that have no frame (their agent could not be read):
    /// to be put back.
    pub(crate) unsent: Vec<WorkId>,
    /// Why a claim (or a read) failed; what the others got is still sent,
    /// since a claimed row left unsent would wait in flight until its lease
    /// ran out.
    pub(crate) failed: Option<StoreError>,
    /// A claim came back full: more may be pending.
    pub(crate) more: bool,
}

/// Claims a session's pending work and turns it into the frames that
/// carry it, on any transport: a socket's drain sends them down the
/// socket, a poll answers with them.
pub(crate) struct Claimer {
    store: Arc<dyn Store>,
    replica: ReplicaId,
    broker: BrokerId,
    session: SessionId,
    /// Agent definitions read so far (every dispatch carries its agent's).
    specs: HashMap<AgentId, AgentSpec>,
}

impl Claimer {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        replica: ReplicaId,
        broker: BrokerId,
        session: SessionId,
    ) -> Self {
        Self {
            store,
            replica,
            broker,
            session,
            specs: HashMap::new(),
        }
    }

    /// Claims up to `limit` intents and `limit` messages (and, with
    /// `calls`, up to `limit` broker calls) of the session's broker.
    pub(crate) async fn pass(&mut self, limit: u32, calls: bool) -> Pass {
        let session = [(self.broker, self.session)];
        // Both claims at once, on two connections: a pass costs one round
        // trip of waiting instead of two. Intents still go out before the
        // messages claimed with them. Broker calls (no agent, no order to
        // keep) ride along.
        let (intents, messages, broker_calls) = tokio::join!(
            self.store.claim_intents(&session, self.replica, limit),
            self.store.claim_messages(&session, self.replica, limit),
            async {
                if calls {
                    self.store
                        .claim_broker_calls(self.broker, self.session, self.replica, limit)
                        .await
                } else {
                    Ok(Vec::new())
                }
            },
        );
        let (intents, intents_failed) = claimed(intents);
        let (messages, messages_failed) = claimed(messages);
        let (broker_calls, calls_failed) = claimed(broker_calls);
        let mut pass = Pass {
            more: intents.len() >= limit as usize || messages.len() >= limit as usize,
            failed: intents_failed.or(messages_failed).or(calls_failed),
            ..Pass::default()
        };
        for intent in intents.into_iter().chain(broker_calls) {
            let id = WorkId::Intent(intent.id);
            let Some(agent_id) = intent.agent_id else {
                let frame = HubFrame::BrokerCall(BrokerCall {
                    id: intent.id.0,
                    name: intent.name.unwrap_or_default(),
                    args: intent.args.0,
                });
                pass.frames.push((frame, id));
                continue;
            };
            if pass.failed.is_some() {
                pass.unsent.push(id);
                continue;
            }
            let agent = match self.spec(agent_id).await {
                Ok(spec) => spec,
                Err(err) => {
                    pass.failed = Some(err);
                    pass.unsent.push(id);
                    continue;
                }
            };
            let frame = HubFrame::Dispatch(Dispatch {
                id: intent.id.0,
                agent_id: agent_id.0,
                op: intent.op,
                name: intent.name,
                agent,
                args: intent.args.0,
            });
            pass.frames.push((frame, id));
        }
        // Files are named in their message's frame; read only for the
        // messages that have some.
        let with_files: Vec<MessageId> = messages
            .iter()
            .filter(|m| m.attachments > 0)
            .map(|m| m.id)
            .collect();
        let mut files: HashMap<MessageId, Vec<AttachmentRef>> = HashMap::new();
        if !with_files.is_empty() {
            match self.store.attachments_of(&with_files).await {
                Ok(rows) => {
                    for row in rows {
                        files
                            .entry(row.message_id)
                            .or_default()
                            .push(AttachmentRef {
                                id: row.id.0,
                                name: row.name,
                                size: u64::try_from(row.size).unwrap_or(0),
                                sha256: row.sha256,
                            });
                    }
                }
                Err(err) => {
                    pass.failed = pass.failed.or(Some(err));
                    pass.unsent
                        .extend(messages.iter().map(|m| WorkId::Message(m.id)));
                    return pass;
                }
            }
        }
        for message in messages {
            let frame = HubFrame::Message(AgentMessage {
                id: message.id.0,
                agent_id: message.agent_id.0,
                seq: message.seq,
                body: message.body.0,
                attachments: files.remove(&message.id).unwrap_or_default(),
            });
            pass.frames.push((frame, WorkId::Message(message.id)));
        }
        pass
    }

    async fn spec(&mut self, agent_id: AgentId) -> Result<AgentSpec, StoreError> {
        if let Some(spec) = self.specs.get(&agent_id) {
            return Ok(spec.clone());
        }
        let row = self.store.agent(agent_id).await?;
        let spec = AgentSpec {
            name: row.name,
            command: row.command.0,
            env: row.env.0,
        };
        self.specs.insert(agent_id, spec.clone());
        Ok(spec)
    }

    /// Puts rows that were claimed and not sent back to `pending`. A
    /// failure is only logged: the rows then wait in flight for the next
    /// session's requeue, the poll requeue or their lease.
    pub(crate) async fn unclaim(&self, rows: &[WorkId]) {
        if rows.is_empty() {
            return;
        }
        let (mut intents, mut messages) = (Vec::new(), Vec::new());
        for row in rows {
            match *row {
                WorkId::Intent(id) => intents.push(id),
                WorkId::Message(id) => messages.push(id),
            }
        }
        if let Err(err) = self.store.unclaim(self.broker, &intents, &messages).await {
            tracing::warn!(broker = %self.broker, %err, "could not put back claimed work that was not sent");
        }
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
