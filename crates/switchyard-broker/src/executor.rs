//! Runs the hub's dispatches and messages: one worker per agent, alive
//! across sessions, handling that agent's frames strictly in arrival order.
//!
//! Because the worker outlives the session that fed it, a dispatch
//! redelivered on a new session queues behind the first copy and finds
//! its outcome remembered: no dispatch id runs twice, even when a session
//! dies while the op is in progress.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use switchyard_proto::{AgentMessage, BrokerCall, Dispatch, DispatchResult, Op};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::dedup::DispatchLog;
use crate::files::HubClient;
use crate::inbox::Inbox;
use crate::layout;
use crate::runtime::{Runtime, RuntimeError};

/// The worker key of broker calls: they keep their own order, apart from
/// every agent's, and their dispatch log lives in `<workdir>/broker/`.
pub(crate) const BROKER_WORKER: Uuid = Uuid::nil();

/// Work waiting per agent before the reader blocks (backpressure).
const AGENT_QUEUE: usize = 1024;

/// Work for one agent.
#[derive(Debug)]
pub(crate) enum Job {
    Dispatch(Dispatch),
    /// A call of the broker's runtime itself; it runs on the broker's own
    /// worker ([`BROKER_WORKER`]).
    BrokerCall(BrokerCall),
    Message(AgentMessage),
}

/// Where a worker sends what comes of a job: the session that received it.
/// If that session is gone, replies are dropped; the hub redelivers.
/// Results go through the session's reader, which sends the status reports
/// an op caused before its result (the hub answers callers as of the result).
#[derive(Clone, Debug)]
pub(crate) struct Replies {
    pub(crate) results: mpsc::UnboundedSender<DispatchResult>,
    pub(crate) acks: mpsc::UnboundedSender<Uuid>,
    /// Fetches a message's files from the session's hub.
    pub(crate) files: Arc<HubClient>,
    /// Cancelled by a worker that could not hand a message over: the
    /// session ends, and the next one gets the message again, first.
    pub(crate) failed: CancellationToken,
    /// Names the session these replies go to.
    session: Uuid,
}

impl Replies {
    pub(crate) fn new(
        results: mpsc::UnboundedSender<DispatchResult>,
        acks: mpsc::UnboundedSender<Uuid>,
        files: Arc<HubClient>,
    ) -> Self {
        Self {
            results,
            acks,
            files,
            failed: CancellationToken::new(),
            session: Uuid::new_v4(),
        }
    }
}

#[derive(Debug)]
struct Work {
    job: Job,
    replies: Replies,
}

pub(crate) struct Executor {
    runtime: Arc<dyn Runtime>,
    workdir: PathBuf,
    workers: HashMap<Uuid, mpsc::Sender<Work>>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("workdir", &self.workdir)
            .field("agents", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Executor {
    pub(crate) fn new(runtime: Arc<dyn Runtime>, workdir: PathBuf) -> Self {
        Self {
            runtime,
            workdir,
            workers: HashMap::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Queues a job behind the agent's earlier ones.
    pub(crate) async fn submit(&mut self, agent_id: Uuid, job: Job, replies: Replies) {
        let sender = self.workers.entry(agent_id).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(AGENT_QUEUE);
            let worker = Worker {
                agent_id,
                dir: if agent_id == BROKER_WORKER {
                    layout::broker_dir(&self.workdir)
                } else {
                    layout::agent_dir(&self.workdir, agent_id)
                },
                runtime: self.runtime.clone(),
                inbox: None,
                dispatches: None,
                failed_on: None,
            };
            self.tracker.spawn(worker.run(rx));
            tx
        });
        if sender.send(Work { job, replies }).await.is_err() {
            tracing::error!(%agent_id, "agent worker is gone; the hub will redeliver");
            self.workers.remove(&agent_id);
        }
    }

    /// Lets every worker finish what it has queued, then returns.
    pub(crate) async fn shutdown(self) {
        drop(self.workers);
        self.tracker.close();
        self.tracker.wait().await;
    }
}

struct Worker {
    agent_id: Uuid,
    dir: PathBuf,
    runtime: Arc<dyn Runtime>,
    /// Opened on first use, so the files are read once per process.
    inbox: Option<Inbox>,
    dispatches: Option<DispatchLog>,
    /// The session on which a message of this agent could not be handed
    /// over: its later messages are left alone (not acked), so the agent
    /// never gets one before the failed one. The next session sends them
    /// all again, in order.
    failed_on: Option<Uuid>,
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<Work>) {
        while let Some(Work { job, replies }) = queue.recv().await {
            match job {
                Job::Dispatch(dispatch) => self.dispatch(dispatch, &replies).await,
                Job::BrokerCall(call) => self.broker_call(call, &replies).await,
                Job::Message(message) => self.message(message, &replies).await,
            }
        }
    }

    async fn dispatch(&mut self, dispatch: Dispatch, replies: &Replies) {
        let runtime = self.runtime.clone();
        tracing::info!(agent_id = %self.agent_id, dispatch_id = %dispatch.id, op = %dispatch.op, "running dispatch");
        self.once(dispatch.id, replies, async move {
            if dispatch.op == Op::Call {
                runtime.call(&dispatch).await
            } else {
                runtime.apply(&dispatch).await
            }
        })
        .await;
    }

    async fn broker_call(&mut self, call: BrokerCall, replies: &Replies) {
        let runtime = self.runtime.clone();
        tracing::info!(dispatch_id = %call.id, name = %call.name, "running broker call");
        self.once(
            call.id,
            replies,
            async move { runtime.broker_call(&call).await },
        )
        .await;
    }

    /// Runs `run` unless dispatch `id` ran already (then its remembered
    /// outcome is sent again), records the outcome, and sends it.
    async fn once(
        &mut self,
        id: Uuid,
        replies: &Replies,
        run: impl Future<Output = Result<Value, RuntimeError>>,
    ) {
        let agent_id = self.agent_id;
        let log = match &mut self.dispatches {
            Some(log) => log,
            None => {
                let opened = match tokio::fs::create_dir_all(&self.dir).await {
                    Ok(()) => DispatchLog::open(&self.dir)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(err) => Err(format!("cannot create {}: {err}", self.dir.display())),
                };
                match opened {
                    Ok(log) => self.dispatches.insert(log),
                    Err(err) => {
                        // Running it without knowing whether it ran already
                        // would break "effectively once"; the hub redelivers.
                        tracing::error!(%agent_id, dispatch_id = %id, "{err}");
                        return;
                    }
                }
            }
        };
        if let Some(outcome) = log.get(id) {
            tracing::debug!(%agent_id, dispatch_id = %id, "redelivered dispatch answered from memory");
            let _ = replies.results.send(outcome.clone());
            return;
        }
        // The hub takes a result frame of at most MAX_MESSAGE_BYTES; a
        // larger one would close the session at every resend.
        let ran = run
            .await
            .and_then(|result| match switchyard_proto::check_payload(&result) {
                Ok(()) => Ok(result),
                Err(too_large) => Err(RuntimeError::other(format!("the result is {too_large}"))),
            });
        let outcome = match ran {
            Ok(result) => DispatchResult {
                dispatch_id: id,
                ok: true,
                result: Some(result),
                error: None,
                code: None,
            },
            Err(error) => {
                tracing::warn!(%agent_id, dispatch_id = %id, "dispatch failed: {error}");
                DispatchResult {
                    dispatch_id: id,
                    ok: false,
                    result: None,
                    error: Some(error.to_string()),
                    code: error.code().map(str::to_owned),
                }
            }
        };
        if let Err(err) = log.record(outcome.clone()).await {
            tracing::error!(%agent_id, dispatch_id = %id, "{err}; a broker restart may run it again");
        }
        let _ = replies.results.send(outcome);
    }

    async fn message(&mut self, message: AgentMessage, replies: &Replies) {
        let agent_id = self.agent_id;
        if self.failed_on == Some(replies.session) {
            tracing::debug!(%agent_id, message_id = %message.id, "left for the next session: an earlier message failed");
            return;
        }
        self.failed_on = None;
        if let Err(err) = self.hand_over(&message, replies).await {
            tracing::error!(%agent_id, message_id = %message.id, "{err}; not acknowledged, ending the session");
            self.failed_on = Some(replies.session);
            replies.failed.cancel();
            return;
        }
        let _ = replies.acks.send(message.id);
    }

    /// Puts the message (and its files) where the agent finds it, unless
    /// it is there already.
    async fn hand_over(&mut self, message: &AgentMessage, replies: &Replies) -> Result<(), String> {
        let agent_id = self.agent_id;
        let inbox = match &mut self.inbox {
            Some(inbox) => inbox,
            None => self
                .inbox
                .insert(Inbox::open(&self.dir).await.map_err(|e| e.to_string())?),
        };
        if inbox.contains(message.id) {
            tracing::debug!(%agent_id, message_id = %message.id, "redelivered message acknowledged again");
            return Ok(());
        }
        // Its files first: the message is handed over (and acked) only
        // with every one of them in place.
        for file in &message.attachments {
            replies
                .files
                .fetch(&self.dir, file)
                .await
                .map_err(|e| e.to_string())?;
        }
        inbox.append(message).await.map_err(|e| e.to_string())?;
        if let Err(err) = self.runtime.deliver(message).await {
            tracing::debug!(%agent_id, message_id = %message.id, "message is in the inbox but not on stdin: {err}");
        }
        Ok(())
    }
}
