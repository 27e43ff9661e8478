//! The originator: the replica whose API call created an intent or a
//! message, and which answers the caller.
//!
//! Its steps, in order:
//! 1. **Write durably.** A 2xx/202 means the row is committed (invariant
//!    1). Single messages go through a group commit: concurrent calls on
//!    this replica share transactions (see [`GroupCommit`]).
//! 2. **Wake the owner** (the replica holding the broker's session), by one
//!    of three routes: `local` (the session is here: wake its drain now, no
//!    NOTIFY on this path, invariant 7); `forward` (storage says another
//!    replica owns it: a wake-up on the bus); `queued` (nobody owns it: the
//!    broker's next session drains the work on connect).
//! 3. **Wait** (synchronous lifecycle calls only): subscribed to events
//!    *before* the write, with a rolling window that any status change of
//!    the agent restarts, and a re-read of the row when the window ends, so
//!    a missed event never turns a success into a timeout.
//!
//! Why nothing is stranded when affinity moves while work is written: the
//! insert reads the owner of the broker's session under a lock that
//! `claim_affinity` has to wait for (see `Inserted::owner`), and a new
//! session claims affinity *before* its first drain. Either the insert saw
//! the new owner (and wakes it), or the new claim came after the commit, so
//! that session's first drain finds the work. Work that was not just
//! inserted (a retried call) is routed by reading affinity from storage
//! after its commit, with the same argument. A wake-up lost on the way is
//! covered by the drain backstop (1 s by default).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use switchyard_store::{
    Agent, AgentId, BroadcastId, BrokerId, Conflict, DispatchIntent, Inserted, IntentId,
    IntentState, Message, MessageId, NewAttachment, NewBroadcast, NewBrokerCall, NewIntent,
    NewMessage, Op, Phase, ReplicaId, Store, StoreError, StoreResult, Target,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::bus::Bus;
use crate::config::HubConfig;
use crate::events::{Events, HubEvent};
use crate::idempotency::Entry;
use crate::metrics::Metrics;
use crate::session::Registry;

#[derive(Debug, thiserror::Error)]
pub(crate) enum OriginatorError {
    /// The operation makes no sense for the agent's phase; nothing was
    /// written.
    #[error("cannot {what} an agent that is {phase}")]
    InvalidPhase { what: String, phase: Phase },
    /// The group-commit writer has stopped: the replica is shutting down.
    #[error("this replica is shutting down")]
    WriterGone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How new work reaches the owner of its broker's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Route {
    /// The broker's session is on this replica.
    Local,
    /// Another replica holds the session and was woken.
    Forward,
    /// No live session: the work waits for the broker.
    Queued,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Forward => "forward",
            Route::Queued => "queued",
        }
    }
}

/// A message written: the row (new, or the original one for a repeated
/// idempotency key) and how its broker's owner was woken, if it was.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) row: Message,
    pub(crate) route: Option<Route>,
}

/// Whether a lifecycle call waits for its outcome, and how long without
/// progress.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    No,
    For(Duration),
}

/// The answer to a lifecycle call.
#[derive(Debug)]
pub(crate) enum Lifecycle {
    /// Not waited for: the intent is durable and its owner woken.
    Accepted { dispatch: IntentId, route: Route },
    /// The broker did it; `agent` is the row after the dispatch (`None`
    /// for a broker call).
    Done {
        agent: Option<Agent>,
        dispatch: DispatchIntent,
    },
    /// The broker reported a failure.
    Failed(DispatchIntent),
    /// Someone withdrew the dispatch before it was sent.
    Cancelled(DispatchIntent),
    /// No outcome and no progress within the window; the row as re-read.
    TimedOut {
        dispatch: DispatchIntent,
        window: Duration,
    },
}

/// The originator's side of this replica. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Originator {
    pub(crate) me: ReplicaId,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) events: Events,
    pub(crate) metrics: Metrics,
    pub(crate) config: Arc<HubConfig>,
    group_commit: GroupCommit,
}

impl Originator {
    /// The originator and its group-commit writer task. The task stops once
    /// every clone of the originator is gone, so calls still in flight
    /// during a graceful shutdown complete.
    pub(crate) fn new(
        me: ReplicaId,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        bus: Arc<dyn Bus>,
        events: Events,
        metrics: Metrics,
        config: Arc<HubConfig>,
    ) -> (Self, impl Future<Output = ()>) {
        let (group_commit, writer) = GroupCommit::start(store.clone());
        let originator = Self {
            me,
            store,
            registry,
            bus,
            events,
            metrics,
            config,
            group_commit,
        };
        (originator, writer)
    }

    /// A message to `agent` with its `lifetime`, under its idempotency
    /// `entry` if the call had a key.
    pub(crate) fn message(
        &self,
        agent: AgentId,
        body: serde_json::Value,
        entry: Option<Entry>,
        lifetime: Lifetime,
    ) -> NewMessage {
        let (idempotency_key, request_digest) = entry.map(|e| (e.key, e.digest)).unzip();
        NewMessage {
            id: MessageId::new(),
            agent_id: agent,
            body,
            expires_at: lifetime.expires_at,
            deliver_after: lifetime.deliver_after,
            idempotency_key,
            request_digest,
        }
    }

    /// Writes one message (through the group commit) and wakes its owner.
    pub(crate) async fn send(&self, message: NewMessage) -> Result<Sent, OriginatorError> {
        let inserted = self.group_commit.write(message).await?;
        let route = if inserted.created {
            self.metrics.messages_accepted.inc();
            Some(self.route_to_owner(inserted.row.broker_id, owner(&inserted), false))
        } else {
            None
        };
        Ok(Sent {
            row: inserted.row,
            route,
        })
    }

    /// Writes one message and its files in one transaction (see
    /// `AttachmentStore::insert_message_with_attachments`) and wakes its
    /// owner.
    pub(crate) async fn send_with_files(
        &self,
        message: NewMessage,
        files: Vec<NewAttachment>,
    ) -> Result<Sent, OriginatorError> {
        let inserted = self
            .store
            .insert_message_with_attachments(message, files)
            .await?;
        Ok(self.route_rows(vec![inserted]).remove(0))
    }

    /// Writes many messages in one all-or-none transaction and wakes each
    /// broker's owner once. A row answers with its broker's route if any row
    /// of that broker was created.
    pub(crate) async fn send_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Sent>, OriginatorError> {
        let rows = self.store.insert_messages(batch).await?;
        Ok(self.route_rows(rows))
    }

    /// One message to every agent `target` selects, in one transaction
    /// (see `WorkStore::insert_broadcast`); each broker's owner is woken
    /// once.
    pub(crate) async fn broadcast(
        &self,
        target: Target,
        body: serde_json::Value,
        entry: Option<Entry>,
        lifetime: Lifetime,
    ) -> Result<(BroadcastId, Vec<Sent>), OriginatorError> {
        let (idempotency_key, request_digest) = entry.map(|e| (e.key, e.digest)).unzip();
        let written = self
            .store
            .insert_broadcast(NewBroadcast {
                id: BroadcastId::new(),
                target,
                body,
                expires_at: lifetime.expires_at,
                deliver_after: lifetime.deliver_after,
                idempotency_key,
                request_digest,
            })
            .await?;
        Ok((written.id, self.route_rows(written.messages)))
    }

    /// Counts the created rows and wakes each of their brokers' owners once.
    /// A row answers with its broker's route if any row of that broker was
    /// created.
    fn route_rows(&self, rows: Vec<Inserted<Message>>) -> Vec<Sent> {
        let created = rows.iter().filter(|r| r.created).count();
        self.metrics.messages_accepted.inc_by(created as u64);
        let owners: BTreeMap<_, _> = rows
            .iter()
            .filter(|r| r.created)
            .map(|r| (r.row.broker_id, owner(r)))
            .collect();
        let routes: HashMap<_, _> = owners
            .into_iter()
            .map(|(broker, owner)| (broker, self.route_to_owner(broker, owner, false)))
            .collect();
        rows.into_iter()
            .map(|r| Sent {
                route: routes.get(&r.row.broker_id).copied(),
                row: r.row,
            })
            .collect()
    }

    /// Writes an intent nobody waits for (preparing a new agent) and wakes
    /// its owner.
    pub(crate) async fn dispatch(
        &self,
        agent: AgentId,
        ask: Ask,
    ) -> Result<Route, OriginatorError> {
        let inserted = self
            .store
            .insert_intent(self.intent(agent, ask, None))
            .await?;
        Ok(self.routed(&inserted, false).await)
    }

    /// A lifecycle call or a named operation: written (or, for a
    /// lifecycle op, joined, or answered from the dispatch its idempotency
    /// key names) in one atomic step with the phase check (see
    /// `WorkStore::insert_lifecycle`), routed, and waited for. A retry acts
    /// on its original dispatch's agent only, and is answered at once if
    /// that dispatch has finished.
    pub(crate) async fn lifecycle(
        &self,
        agent: &Agent,
        ask: Ask,
        entry: Option<Entry>,
        wait: Wait,
    ) -> Result<Lifecycle, OriginatorError> {
        // Subscribe before the intent exists, so its outcome cannot slip by.
        let events = self.events.subscribe();
        let allowed = allowed_phases(ask.op);
        let what = ask.to_string();
        let inserted = match self
            .store
            .insert_lifecycle(self.intent(agent.id, ask, entry), allowed)
            .await
        {
            Err(StoreError::Conflict(Conflict::Phase(phase))) => {
                return Err(OriginatorError::InvalidPhase { what, phase });
            }
            inserted => inserted?,
        };
        self.routed_and_waited(events, inserted, wait, Some(agent))
            .await
    }

    /// A named operation of the broker's runtime itself: written, routed
    /// and waited for like a call on an agent, outside every agent's
    /// order.
    pub(crate) async fn broker_call(
        &self,
        broker: BrokerId,
        name: String,
        args: serde_json::Value,
        entry: Option<Entry>,
        wait: Wait,
    ) -> Result<Lifecycle, OriginatorError> {
        let events = self.events.subscribe();
        let (idempotency_key, request_digest) = entry.map(|e| (e.key, e.digest)).unzip();
        let inserted = self
            .store
            .insert_broker_call(NewBrokerCall {
                id: IntentId::new(),
                broker_id: broker,
                name,
                args,
                deadline: after(self.config.intent_deadline),
                idempotency_key,
                request_digest,
            })
            .await?;
        self.routed_and_waited(events, inserted, wait, None).await
    }

    /// Routes an intent just written and, if the caller waits, waits for
    /// its outcome (subscribed in `events` before the write). `agent` is
    /// the agent the intent acts on (`None` for a broker call): any status
    /// change of it restarts the window, and a done dispatch answers with
    /// the agent as it is after it.
    async fn routed_and_waited(
        &self,
        mut events: broadcast::Receiver<HubEvent>,
        inserted: Inserted<DispatchIntent>,
        wait: Wait,
        agent: Option<&Agent>,
    ) -> Result<Lifecycle, OriginatorError> {
        let route = self.routed(&inserted, matches!(wait, Wait::For(_))).await;
        let intent = inserted.row;
        let Wait::For(window) = wait else {
            return Ok(Lifecycle::Accepted {
                dispatch: intent.id,
                route,
            });
        };
        // A retried call's dispatch may have finished already: its row, read
        // after the subscription, says so, and no event will.
        let intent = if finished(&intent) {
            intent
        } else {
            self.wait_for_outcome(&mut events, intent.id, agent.map(|a| a.id), window)
                .await?
        };
        Ok(match intent.state {
            IntentState::Done => {
                let agent = match agent {
                    Some(agent) if intent.op == Op::Delete => {
                        Some(self.store.mark_agent_deleted(agent.id).await?)
                    }
                    Some(agent) => Some(self.store.agent(agent.id).await?),
                    None => None,
                };
                Lifecycle::Done {
                    agent,
                    dispatch: intent,
                }
            }
            IntentState::Failed => Lifecycle::Failed(intent),
            IntentState::Cancelled => Lifecycle::Cancelled(intent),
            IntentState::Pending | IntentState::InProgress => Lifecycle::TimedOut {
                dispatch: intent,
                window,
            },
        })
    }

    fn intent(&self, agent: AgentId, ask: Ask, entry: Option<Entry>) -> NewIntent {
        let (idempotency_key, request_digest) = entry.map(|e| (e.key, e.digest)).unzip();
        NewIntent {
            id: IntentId::new(),
            agent_id: agent,
            op: ask.op,
            name: ask.name,
            args: ask.args,
            deadline: after(self.config.intent_deadline),
            idempotency_key,
            request_digest,
        }
    }

    /// Counts and routes an intent just written: a created one to the owner
    /// its insert read; a retried one (its row already existed and may
    /// still wait) to whoever owns the session now.
    async fn routed(&self, inserted: &Inserted<DispatchIntent>, urgent: bool) -> Route {
        let broker = inserted.row.broker_id;
        if inserted.created {
            self.metrics
                .intents_published
                .with_label_values(&[inserted.row.op.as_str()])
                .inc();
            self.route_to_owner(broker, owner(inserted), urgent)
        } else {
            self.route_by_storage(broker, urgent).await
        }
    }

    /// Wakes whoever must send the broker's work, given the owner an
    /// insert read: no second read of storage. `urgent` when the caller
    /// waits for the outcome: its wake-up skips the debounce.
    fn route_to_owner(&self, broker: BrokerId, owner: Option<ReplicaId>, urgent: bool) -> Route {
        if self.registry.wake(broker) {
            return self.counted(Route::Local);
        }
        self.forward_or_queue(broker, owner, urgent)
    }

    /// Wakes whoever sends the broker's work: some of it that waited may
    /// be free to go (an operation it waited for finished).
    pub(crate) async fn wake(&self, broker: BrokerId) {
        self.route_by_storage(broker, false).await;
    }

    /// Wakes whoever must send the broker's work, reading from storage
    /// which replica owns its session.
    async fn route_by_storage(&self, broker: BrokerId, urgent: bool) -> Route {
        if self.registry.wake(broker) {
            return self.counted(Route::Local);
        }
        // Never cached: a cached owner could be a replica that lost the
        // session a moment ago.
        match self.store.broker(broker).await {
            Ok(row) => self.forward_or_queue(broker, row.connected_replica, urgent),
            Err(err) => {
                tracing::warn!(%broker, %err, "cannot read affinity; the work waits for a drain");
                self.counted(Route::Queued)
            }
        }
    }

    /// The broker has no session here: wake its owner over the bus, or
    /// leave the work for its next session.
    fn forward_or_queue(&self, broker: BrokerId, owner: Option<ReplicaId>, urgent: bool) -> Route {
        let route = match owner {
            Some(owner) if owner != self.me && self.bus.wake(owner, broker, urgent) => {
                Route::Forward
            }
            _ => Route::Queued,
        };
        self.counted(route)
    }

    fn counted(&self, route: Route) -> Route {
        self.metrics
            .routes
            .with_label_values(&[route.as_str()])
            .inc();
        route
    }

    /// Waits for the intent to finish; any status change of the agent
    /// restarts the window. Returns the row as last read: finished, or still
    /// open if the window ran out.
    async fn wait_for_outcome(
        &self,
        events: &mut broadcast::Receiver<HubEvent>,
        intent: IntentId,
        agent: Option<AgentId>,
        window: Duration,
    ) -> StoreResult<DispatchIntent> {
        let mut deadline = Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Ok(HubEvent::DispatchFinished(row))) if row.id == intent => return Ok(row),
                Ok(Ok(HubEvent::AgentStatus(row))) if Some(row.id) == agent => {
                    deadline = Instant::now() + window;
                }
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    let row = self.store.intent(intent).await?;
                    if finished(&row) {
                        return Ok(row);
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
            }
        }
        self.store.intent(intent).await
    }
}

fn finished(intent: &DispatchIntent) -> bool {
    matches!(
        intent.state,
        IntentState::Done | IntentState::Failed | IntentState::Cancelled
    )
}

/// The owner of the broker's session that a created row's insert read.
fn owner<T>(inserted: &Inserted<T>) -> Option<ReplicaId> {
    inserted.owner
}

fn after(duration: Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// The phases in which `op` makes sense.
fn allowed_phases(op: Op) -> &'static [Phase] {
    use Phase::*;
    match op {
        // Only a caller that waits for the create it wrote with the agent.
        Op::Create => &[Created],
        Op::Start => &[Created, Stopped, Error],
        Op::Stop => &[Starting, Running],
        Op::Restart => &[Created, Starting, Running, Stopped, Error],
        Op::Delete => &[Created, Starting, Running, Stopping, Stopped, Error],
        // The runtime answers whatever the phase; a deleted agent has none.
        Op::Call => &[Created, Starting, Running, Stopping, Stopped, Error],
    }
}

/// When a message may go and until when: it is not sent before
/// `deliver_after` (holding back its agent's later work meanwhile) and
/// expires, undelivered, at `expires_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub(crate) expires_at: chrono::DateTime<chrono::Utc>,
    pub(crate) deliver_after: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a dispatch asks of the broker: a lifecycle op, or a named
/// operation with its arguments.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Ask {
    op: Op,
    name: Option<String>,
    args: serde_json::Value,
}

impl Ask {
    pub(crate) fn lifecycle(op: Op) -> Self {
        Self {
            op,
            name: None,
            args: json!({}),
        }
    }

    /// Preparing a new agent, with the arguments the runtime's create
    /// takes.
    pub(crate) fn create(args: serde_json::Value) -> Self {
        Self {
            op: Op::Create,
            name: None,
            args,
        }
    }

    /// The named operation `name` (checked by the caller with
    /// `switchyard_proto::check_op_name`).
    pub(crate) fn call(name: String, args: serde_json::Value) -> Self {
        Self {
            op: Op::Call,
            name: Some(name),
            args,
        }
    }
}

impl std::fmt::Display for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "run {name} on"),
            None => write!(f, "{}", self.op),
        }
    }
}

/// Most messages written in one shared transaction.
const MAX_GROUP: usize = 1024;

type Reply = oneshot::Sender<StoreResult<Inserted<Message>>>;

/// Group commit for single messages: concurrent calls on one replica share
/// transactions.
///
/// Each call queues its message with a reply channel; one task takes
/// everything waiting, writes it in one all-or-none batch, and answers each
/// caller after the commit. Under load many calls share one transaction
/// (one fsync, one round trip); an idle replica writes each call alone with
/// no added delay. If a shared batch fails (one bad item makes a batch
/// all-or-none), each item is retried alone, so one caller's bad input
/// never fails another caller's message.
#[derive(Clone, Debug)]
struct GroupCommit {
    tx: mpsc::Sender<(NewMessage, Reply)>,
}

impl GroupCommit {
    fn start(store: Arc<dyn Store>) -> (Self, impl Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_GROUP);
        (Self { tx }, write_groups(store, rx))
    }

    /// Writes one message; returns once it is committed.
    async fn write(&self, message: NewMessage) -> Result<Inserted<Message>, OriginatorError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((message, reply))
            .await
            .map_err(|_| OriginatorError::WriterGone)?;
        Ok(answer.await.map_err(|_| OriginatorError::WriterGone)??)
    }
}

async fn write_groups(store: Arc<dyn Store>, mut rx: mpsc::Receiver<(NewMessage, Reply)>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.recv().await {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        let (messages, mut replies): (Vec<NewMessage>, Vec<Reply>) = group.drain(..).unzip();
        match store.insert_messages(messages.clone()).await {
            Ok(rows) => {
                for (row, reply) in rows.into_iter().zip(replies) {
                    let _ = reply.send(Ok(row));
                }
            }
            Err(err) if replies.len() == 1 => {
                if let Some(reply) = replies.pop() {
                    let _ = reply.send(Err(err));
                }
            }
            Err(_) => {
                for (message, reply) in messages.into_iter().zip(replies) {
                    let result = store
                        .insert_messages(vec![message])
                        .await
                        .map(|mut rows| rows.remove(0));
                    let _ = reply.send(result);
                }
            }
        }
    }
}
