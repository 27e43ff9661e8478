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

use switchyard_proto::{AgentMessage, Dispatch, DispatchResult, Op};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::dedup::DispatchLog;
use crate::inbox::Inbox;
use crate::layout;
use crate::runtime::{Runtime, RuntimeError};

/// Work waiting per agent before the reader blocks (backpressure).
const AGENT_QUEUE: usize = 1024;

/// Work for one agent.
#[derive(Debug)]
pub(crate) enum Job {
    Dispatch(Dispatch),
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
                dir: layout::agent_dir(&self.workdir, agent_id),
                runtime: self.runtime.clone(),
                inbox: None,
                dispatches: None,
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
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<Work>) {
        while let Some(Work { job, replies }) = queue.recv().await {
            match job {
                Job::Dispatch(dispatch) => self.dispatch(dispatch, &replies).await,
                Job::Message(message) => self.message(message, &replies).await,
            }
        }
    }

    async fn dispatch(&mut self, dispatch: Dispatch, replies: &Replies) {
        let agent_id = self.agent_id;
        let log = match &mut self.dispatches {
            Some(log) => log,
            None => match DispatchLog::open(&self.dir).await {
                Ok(log) => self.dispatches.insert(log),
                Err(err) => {
                    // Running it without knowing whether it ran already would
                    // break "effectively once"; the hub redelivers later.
                    tracing::error!(%agent_id, dispatch_id = %dispatch.id, "{err}");
                    return;
                }
            },
        };
        if let Some(outcome) = log.get(dispatch.id) {
            tracing::debug!(%agent_id, dispatch_id = %dispatch.id, "redelivered dispatch answered from memory");
            let _ = replies.results.send(outcome.clone());
            return;
        }
        tracing::info!(%agent_id, dispatch_id = %dispatch.id, op = %dispatch.op, "running dispatch");
        let ran = if dispatch.op == Op::Call {
            self.runtime.call(&dispatch).await
        } else {
            self.runtime.apply(&dispatch).await
        };
        // The hub takes a result frame of at most MAX_MESSAGE_BYTES; a
        // larger one would close the session at every resend.
        let ran = ran.and_then(|result| match switchyard_proto::check_payload(&result) {
            Ok(()) => Ok(result),
            Err(too_large) => Err(RuntimeError::other(format!("the result is {too_large}"))),
        });
        let outcome = match ran {
            Ok(result) => DispatchResult {
                dispatch_id: dispatch.id,
                ok: true,
                result: Some(result),
                error: None,
                code: None,
            },
            Err(error) => {
                tracing::warn!(%agent_id, dispatch_id = %dispatch.id, op = %dispatch.op, "dispatch failed: {error}");
                DispatchResult {
                    dispatch_id: dispatch.id,
                    ok: false,
                    result: None,
                    error: Some(error.to_string()),
                    code: error.code().map(str::to_owned),
                }
            }
        };
        if let Err(err) = log.record(outcome.clone()).await {
            tracing::error!(%agent_id, dispatch_id = %dispatch.id, "{err}; a broker restart may run it again");
        }
        let _ = replies.results.send(outcome);
    }

    async fn message(&mut self, message: AgentMessage, replies: &Replies) {
        let agent_id = self.agent_id;
        let inbox = match &mut self.inbox {
            Some(inbox) => inbox,
            None => match Inbox::open(&self.dir).await {
                Ok(inbox) => self.inbox.insert(inbox),
                Err(err) => {
                    tracing::error!(%agent_id, message_id = %message.id, "{err}; not acknowledged");
                    return;
                }
            },
        };
        if inbox.contains(message.id) {
            tracing::debug!(%agent_id, message_id = %message.id, "redelivered message acknowledged again");
        } else {
            if let Err(err) = inbox.append(&message).await {
                tracing::error!(%agent_id, message_id = %message.id, "{err}; not acknowledged");
                return;
            }
            if let Err(err) = self.runtime.deliver(&message).await {
                tracing::debug!(%agent_id, message_id = %message.id, "message is in the inbox but not on stdin: {err}");
            }
        }
        let _ = replies.acks.send(message.id);
    }
}
