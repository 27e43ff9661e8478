//! [`ProcessRuntime`]: the reference runtime, agents as local processes.
//!
//! Each agent lives in `<workdir>/agents/<agent-id>/` (see [`crate::agent_dir`]):
//! its process runs there with `command` and a clean environment (see
//! [`INHERITED_ENV`]), its stdout/stderr are appended to `stdout.log` and
//! `stderr.log`, and each delivered message is written to its stdin as the
//! same line the SDK put into `inbox.jsonl`.
//!
//! Each agent runs in its own process group, so stop signals reach the
//! whole tree it spawned: SIGTERM, then SIGKILL after the grace period.
//! `state.json` records the last settled phase; a broker that starts and
//! finds `running` there starts the agent again (its process died with the
//! old broker, which held its stdin).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use switchyard_proto::{AgentMessage, AgentSpec, AgentStatus, BrokerCall, Dispatch, Op, Phase};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{broadcast, mpsc, watch};
use uuid::Uuid;

use crate::inbox::inbox_line;
use crate::layout;
use crate::runtime::{Runtime, RuntimeError, next_seq};

/// Status changes buffered per subscriber before it lags.
const STATUS_FEED: usize = 1024;
/// How long to wait for a process to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How [`ProcessRuntime`] runs agents.
#[derive(Clone, Debug)]
pub struct ProcessConfig {
    /// Root of the broker's files; the same as [`crate::BrokerConfig::workdir`].
    pub workdir: PathBuf,
    /// How long a stopping agent gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

impl ProcessConfig {
    /// A config with the default 5 s stop grace.
    pub fn new(workdir: impl Into<PathBuf>) -> Self {
        Self {
            workdir: workdir.into(),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// Why [`ProcessRuntime::new`] could not load the agents of its workdir.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot read the agents under {}: {source}", path.display())]
    Scan { path: PathBuf, source: io::Error },
}

/// The variables an agent inherits from the broker's environment, when the
/// broker has them. Nothing else of the broker's environment reaches an
/// agent: the broker's secret, an admin token or cloud credentials exported
/// where the broker was started stay with the broker.
///
/// An agent's environment is, in this order (a later one wins): these
/// variables, the agent's own `env` from its definition, then the facts
/// about the agent, which it can rely on:
///
/// - `SWITCHYARD_AGENT_ID`: the agent's id;
/// - `SWITCHYARD_AGENT_NAME`: its name;
/// - `SWITCHYARD_AGENT_DIR`: its directory (also its working directory);
/// - `SWITCHYARD_INBOX`: the `inbox.jsonl` file its messages are appended to.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "TERM",
];

/// Runs agents as local processes. Cheap to clone (shared state).
///
/// Status changes go to every [`Runtime::subscribe`] receiver; each carries
/// a fresh [`next_seq`].
///
/// # Example
///
/// ```
/// use serde_json::{Value, json};
/// use switchyard_broker::{ProcessConfig, ProcessRuntime, Runtime};
/// use switchyard_proto::{AgentMessage, AgentSpec, Dispatch, Op};
/// use uuid::Uuid;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let workdir = tempfile::tempdir()?;
/// let runtime = ProcessRuntime::new(ProcessConfig::new(workdir.path())).await?;
/// let agent_id = Uuid::new_v4();
/// let spec = AgentSpec {
///     name: "sink".into(),
///     command: vec!["cat".into()], // copies its stdin to `stdout.log`
///     env: Default::default(),
/// };
/// let dispatch = |op| Dispatch {
///     id: Uuid::new_v4(), agent_id, op, name: None, agent: spec.clone(), args: Value::Null,
/// };
///
/// let started = runtime.apply(&dispatch(Op::Start)).await?;
/// assert_eq!(started["phase"], "running");
/// // A named operation (see `switchyard_broker::operations`).
/// let inspect = Dispatch { name: Some("inspect".into()), ..dispatch(Op::Call) };
/// let facts = runtime.call(&inspect).await?;
/// assert_eq!(facts["phase"], "running");
/// assert_eq!(facts["pid"], started["pid"]);
/// let hello = AgentMessage { id: Uuid::new_v4(), agent_id, seq: 1, body: json!("hello"), attachments: vec![] };
/// runtime.deliver(&hello).await?; // one JSON line on the agent's stdin
/// let stopped = runtime.apply(&dispatch(Op::Stop)).await?;
/// assert_eq!(stopped, json!({ "phase": "stopped", "pid": null }));
/// runtime.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ProcessConfig,
    agents: Mutex<HashMap<Uuid, Agent>>,
    feed: broadcast::Sender<AgentStatus>,
    generations: AtomicU64,
}

#[derive(Debug)]
struct Agent {
    spec: AgentSpec,
    status: AgentStatus,
    process: Option<Process>,
    /// Serializes lifecycle ops on this agent (the SDK already does per
    /// dispatch; this also covers startup and shutdown).
    ops: Arc<tokio::sync::Mutex<()>>,
}

/// A spawned agent process.
#[derive(Debug)]
struct Process {
    pid: u32,
    /// Tells exits of this process from those of an earlier one.
    generation: u64,
    /// Lines for the stdin pump; dropping it closes the agent's stdin.
    stdin: mpsc::UnboundedSender<String>,
    exited: watch::Receiver<Option<ExitStatus>>,
    /// Set while the broker stops it on purpose: the exit is then reported
    /// by the stopper, not as the agent's own doing.
    stopping: bool,
    started: std::time::Instant,
}

/// An agent's phase, pid, uptime and last exit code.
#[derive(Debug)]
pub(crate) struct Facts {
    pub(crate) phase: Phase,
    pub(crate) pid: Option<u32>,
    pub(crate) uptime: Option<Duration>,
    pub(crate) exit_code: Option<i32>,
}

/// `state.json`: the last settled phase.
#[derive(Debug, Serialize, Deserialize)]
struct SavedState {
    phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
}

impl ProcessRuntime {
    /// Loads the agents found under `<workdir>/agents/` and starts again
    /// those that were running when the previous broker ended.
    pub async fn new(config: ProcessConfig) -> Result<Self, ProcessError> {
        let (feed, _) = broadcast::channel(STATUS_FEED);
        let runtime = Self {
            inner: Arc::new(Inner {
                config,
                agents: Mutex::new(HashMap::new()),
                feed,
                generations: AtomicU64::new(0),
            }),
        };
        let resume = runtime.load().await?;
        for agent_id in resume {
            if let Err(err) = runtime.start(agent_id).await {
                tracing::warn!(%agent_id, "cannot restart agent: {err}");
            }
        }
        Ok(runtime)
    }

    /// Stops every running agent (SIGTERM, SIGKILL after the grace period)
    /// without recording it, so the next broker on this workdir starts them
    /// again. For a broker that exits: no agent outlives it as an orphan.
    pub async fn shutdown(&self) {
        let targets: Vec<_> = {
            let mut agents = self.inner.lock();
            agents
                .values_mut()
                .filter_map(|agent| agent.process.as_mut())
                .map(|process| {
                    process.stopping = true;
                    (process.pid, process.exited.clone())
                })
                .collect()
        };
        let grace = self.inner.config.stop_grace;
        futures::future::join_all(
            targets
                .into_iter()
                .map(|(pid, exited)| terminate(pid, exited, grace)),
        )
        .await;
    }

    fn dir(&self, agent_id: Uuid) -> PathBuf {
        layout::agent_dir(&self.inner.config.workdir, agent_id)
    }

    /// Reads the agents on disk; returns those to start again.
    async fn load(&self) -> Result<Vec<Uuid>, ProcessError> {
        let root = layout::agents_dir(&self.inner.config.workdir);
        let scan = |source| ProcessError::Scan {
            path: root.clone(),
            source,
        };
        let mut entries = match tokio::fs::read_dir(&root).await {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(scan(err)),
        };
        let mut resume = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(scan)? {
            let Some(agent_id) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<Uuid>().ok())
            else {
                continue;
            };
            let dir = entry.path();
            let Some(spec) = read_json::<AgentSpec>(&dir.join(layout::SPEC)).await else {
                // Only messages were ever delivered here; nothing to run.
                continue;
            };
            let saved = read_json::<SavedState>(&dir.join(layout::STATE)).await;
            let deleted = tokio::fs::try_exists(dir.join(layout::DELETED))
                .await
                .unwrap_or(false);
            let (phase, exit_code) = match saved {
                _ if deleted => (Phase::Deleted, None),
                Some(SavedState {
                    phase: Phase::Running | Phase::Starting,
                    ..
                }) => {
                    resume.push(agent_id);
                    (Phase::Stopped, None)
                }
                Some(SavedState {
                    phase: Phase::Stopping,
                    ..
                }) => (Phase::Stopped, None),
                Some(SavedState { phase, exit_code }) => (phase, exit_code),
                None => (Phase::Created, None),
            };
            let agent = Agent {
                spec,
                status: status(agent_id, phase, exit_code, None),
                process: None,
                ops: Arc::default(),
            };
            self.inner.lock().insert(agent_id, agent);
        }
        Ok(resume)
    }

    /// Records the agent (dir, `spec.json`) if new, with the latest spec.
    async fn ensure(&self, agent_id: Uuid, spec: &AgentSpec) -> Result<(), RuntimeError> {
        let dir = self.dir(agent_id);
        if let Err(source) = tokio::fs::create_dir_all(&dir).await {
            return Err(RuntimeError::AgentDir { path: dir, source });
        }
        let spec_json = serde_json::to_vec_pretty(spec).map_err(RuntimeError::EncodeSpec)?;
        write_atomic(&dir.join(layout::SPEC), &spec_json)
            .await
            .map_err(RuntimeError::WriteSpec)?;
        let created = {
            let mut agents = self.inner.lock();
            match agents.get_mut(&agent_id) {
                Some(agent) if agent.status.phase == Phase::Deleted => {
                    return Err(RuntimeError::Deleted(agent_id));
                }
                Some(agent) => {
                    agent.spec = spec.clone();
                    false
                }
                None => {
                    agents.insert(
                        agent_id,
                        Agent {
                            spec: spec.clone(),
                            status: status(agent_id, Phase::Created, None, None),
                            process: None,
                            ops: Arc::default(),
                        },
                    );
                    true
                }
            }
        };
        if created {
            self.settle(agent_id, Phase::Created, None, None).await;
        }
        Ok(())
    }

    fn ops_lock(&self, agent_id: Uuid) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.inner.lock().get(&agent_id).map(|a| a.ops.clone())
    }

    /// Starts the agent unless it runs already.
    async fn start(&self, agent_id: Uuid) -> Result<Value, RuntimeError> {
        let ops = self.ops_lock(agent_id).ok_or(RuntimeError::UnknownAgent)?;
        let _op = ops.lock().await;
        self.start_locked(agent_id).await
    }

    async fn start_locked(&self, agent_id: Uuid) -> Result<Value, RuntimeError> {
        let spec = {
            let agents = self.inner.lock();
            let agent = agents.get(&agent_id).ok_or(RuntimeError::UnknownAgent)?;
            if agent.status.phase == Phase::Deleted {
                return Err(RuntimeError::Deleted(agent_id));
            }
            if let Some(process) = &agent.process {
                return Ok(outcome(agent.status.phase, Some(process.pid)));
            }
            agent.spec.clone()
        };
        let Some((program, args)) = spec.command.split_first() else {
            return Err(RuntimeError::EmptyCommand);
        };
        self.transition(agent_id, Phase::Starting, None, None);

        let child = match self.spawn(agent_id, program, args, &spec) {
            Ok(child) => child,
            Err(source) => {
                let err = RuntimeError::Spawn {
                    program: program.clone(),
                    source,
                };
                self.settle(agent_id, Phase::Error, None, Some(err.to_string()))
                    .await;
                return Err(err);
            }
        };
        let pid = child.id().unwrap_or_default();
        let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed);
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let mut child = child;
        if let Some(stdin) = child.stdin.take() {
            tokio::spawn(pump_stdin(stdin, stdin_rx));
        }
        if let Some(agent) = self.inner.lock().get_mut(&agent_id) {
            agent.process = Some(Process {
                pid,
                generation,
                stdin: stdin_tx,
                exited: exit_rx,
                stopping: false,
                started: std::time::Instant::now(),
            });
        }
        tokio::spawn(watch_exit(
            self.clone(),
            agent_id,
            generation,
            child,
            exit_tx,
        ));
        tracing::info!(%agent_id, pid, "agent started");
        self.settle(agent_id, Phase::Running, None, None).await;
        Ok(outcome(Phase::Running, Some(pid)))
    }

    fn spawn(
        &self,
        agent_id: Uuid,
        program: &str,
        args: &[String],
        spec: &AgentSpec,
    ) -> io::Result<Child> {
        let dir = self.dir(agent_id);
        let log = |name| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
        };
        self.command(agent_id, spec, program, args)
            .stdin(Stdio::piped())
            .stdout(log(layout::STDOUT)?)
            .stderr(log(layout::STDERR)?)
            .spawn()
    }

    /// `program` with `args` as the agent runs things: in its directory,
    /// with its clean environment (see [`INHERITED_ENV`]), in a process
    /// group of its own, killed if dropped.
    pub(crate) fn command(
        &self,
        agent_id: Uuid,
        spec: &AgentSpec,
        program: &str,
        args: &[String],
    ) -> Command {
        let dir = self.dir(agent_id);
        let inherited = INHERITED_ENV
            .iter()
            .filter_map(|name| std::env::var_os(name).map(|value| (*name, value)));
        let facts = [
            ("SWITCHYARD_AGENT_ID", agent_id.to_string().into()),
            ("SWITCHYARD_AGENT_NAME", spec.name.clone().into()),
            ("SWITCHYARD_AGENT_DIR", dir.clone().into_os_string()),
            ("SWITCHYARD_INBOX", dir.join(layout::INBOX).into_os_string()),
        ];
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(inherited)
            .envs(&spec.env)
            .envs(facts)
            .current_dir(&dir)
            .process_group(0)
            .kill_on_drop(true);
        command
    }

    /// What `inspect` reports of the agent, as this runtime knows it.
    pub(crate) fn facts(&self, agent_id: Uuid) -> Option<Facts> {
        let agents = self.inner.lock();
        let agent = agents.get(&agent_id)?;
        let process = agent.process.as_ref();
        Some(Facts {
            phase: agent.status.phase,
            pid: process.map(|p| p.pid),
            uptime: process.map(|p| p.started.elapsed()),
            exit_code: agent.status.exit_code,
        })
    }

    /// Every agent the runtime knows, deleted ones excepted: id, name,
    /// phase and pid, by id.
    pub(crate) fn listing(&self) -> Vec<(Uuid, String, Phase, Option<u32>)> {
        let agents = self.inner.lock();
        let mut list: Vec<_> = agents
            .iter()
            .filter(|(_, a)| a.status.phase != Phase::Deleted)
            .map(|(id, a)| {
                let pid = a.process.as_ref().map(|p| p.pid);
                (*id, a.spec.name.clone(), a.status.phase, pid)
            })
            .collect();
        list.sort_by_key(|(id, ..)| *id);
        list
    }

    pub(crate) fn agent_dir_of(&self, agent_id: Uuid) -> PathBuf {
        self.dir(agent_id)
    }

    /// Stops the agent if it runs; otherwise leaves its phase as it is.
    async fn stop_locked(&self, agent_id: Uuid) -> Result<Value, RuntimeError> {
        let target = {
            let mut agents = self.inner.lock();
            let agent = agents
                .get_mut(&agent_id)
                .ok_or(RuntimeError::UnknownAgent)?;
            match agent.process.as_mut() {
                None => return Ok(outcome(agent.status.phase, None)),
                Some(process) => {
                    process.stopping = true;
                    (process.pid, process.generation, process.exited.clone())
                }
            }
        };
        let (pid, generation, exited) = target;
        self.transition(agent_id, Phase::Stopping, None, None);
        terminate(pid, exited, self.inner.config.stop_grace).await;
        if let Some(agent) = self.inner.lock().get_mut(&agent_id)
            && agent
                .process
                .as_ref()
                .is_some_and(|p| p.generation == generation)
        {
            agent.process = None;
        }
        tracing::info!(%agent_id, pid, "agent stopped");
        self.settle(agent_id, Phase::Stopped, None, None).await;
        Ok(outcome(Phase::Stopped, None))
    }

    async fn delete_locked(&self, agent_id: Uuid) -> Result<Value, RuntimeError> {
        self.stop_locked(agent_id).await?;
        let marker = self.dir(agent_id).join(layout::DELETED);
        write_atomic(&marker, b"")
            .await
            .map_err(RuntimeError::MarkDeleted)?;
        self.settle(agent_id, Phase::Deleted, None, None).await;
        Ok(outcome(Phase::Deleted, None))
    }

    /// Sets and reports a phase without recording it.
    fn transition(
        &self,
        agent_id: Uuid,
        phase: Phase,
        exit_code: Option<i32>,
        detail: Option<String>,
    ) {
        let report = status(agent_id, phase, exit_code, detail);
        if let Some(agent) = self.inner.lock().get_mut(&agent_id) {
            agent.status = report.clone();
        }
        // No subscriber (no session) is fine: the next hello carries it.
        let _ = self.inner.feed.send(report);
    }

    /// Sets, records (`state.json`) and reports a settled phase.
    async fn settle(
        &self,
        agent_id: Uuid,
        phase: Phase,
        exit_code: Option<i32>,
        detail: Option<String>,
    ) {
        let saved = SavedState { phase, exit_code };
        let path = self.dir(agent_id).join(layout::STATE);
        match serde_json::to_vec(&saved) {
            Ok(bytes) => {
                if let Err(err) = write_atomic(&path, &bytes).await {
                    tracing::warn!(%agent_id, "cannot record the agent's phase: {err}");
                }
            }
            Err(err) => tracing::warn!(%agent_id, "cannot record the agent's phase: {err}"),
        }
        self.transition(agent_id, phase, exit_code, detail);
    }

    /// Called when an agent process ended. Reports it unless the broker is
    /// stopping it on purpose or it is no longer the agent's current process.
    async fn exited(&self, agent_id: Uuid, generation: u64, exit: io::Result<ExitStatus>) {
        let own_doing = {
            let mut agents = self.inner.lock();
            match agents.get_mut(&agent_id) {
                Some(agent)
                    if agent
                        .process
                        .as_ref()
                        .is_some_and(|p| p.generation == generation && !p.stopping) =>
                {
                    agent.process = None;
                    true
                }
                _ => false,
            }
        };
        if !own_doing {
            return;
        }
        let (phase, exit_code, detail) = match exit {
            Ok(status) if status.success() => (Phase::Stopped, Some(0), None),
            Ok(status) => match status.code() {
                Some(code) => (
                    Phase::Error,
                    Some(code),
                    Some(format!("exited with {code}")),
                ),
                None => (Phase::Error, None, Some(format!("ended by {status}"))),
            },
            Err(err) => (
                Phase::Error,
                None,
                Some(format!("cannot wait for it: {err}")),
            ),
        };
        tracing::info!(%agent_id, %phase, ?exit_code, "agent exited by itself");
        self.settle(agent_id, phase, exit_code, detail).await;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Agent>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Runtime for ProcessRuntime {
    async fn apply(&self, dispatch: &Dispatch) -> Result<Value, RuntimeError> {
        let agent_id = dispatch.agent_id;
        if dispatch.op == Op::Delete {
            let already = self
                .inner
                .lock()
                .get(&agent_id)
                .is_some_and(|a| a.status.phase == Phase::Deleted);
            if already {
                return Ok(outcome(Phase::Deleted, None));
            }
        }
        self.ensure(agent_id, &dispatch.agent).await?;
        let ops = self.ops_lock(agent_id).ok_or(RuntimeError::UnknownAgent)?;
        let _op = ops.lock().await;
        match dispatch.op {
            Op::Create => {
                let agents = self.inner.lock();
                let agent = agents.get(&agent_id).ok_or(RuntimeError::UnknownAgent)?;
                Ok(outcome(
                    agent.status.phase,
                    agent.process.as_ref().map(|p| p.pid),
                ))
            }
            Op::Start => self.start_locked(agent_id).await,
            Op::Stop => self.stop_locked(agent_id).await,
            Op::Restart => {
                self.stop_locked(agent_id).await?;
                self.start_locked(agent_id).await
            }
            Op::Delete => self.delete_locked(agent_id).await,
            Op::Call => Err(RuntimeError::other("a call is not a lifecycle op")),
        }
    }

    async fn call(&self, dispatch: &Dispatch) -> Result<Value, RuntimeError> {
        self.ensure(dispatch.agent_id, &dispatch.agent).await?;
        crate::operations::call(self, dispatch).await
    }

    async fn broker_call(&self, call: &BrokerCall) -> Result<Value, RuntimeError> {
        crate::operations::broker_call(self, call)
    }

    async fn deliver(&self, message: &AgentMessage) -> Result<(), RuntimeError> {
        let agents = self.inner.lock();
        let process = agents
            .get(&message.agent_id)
            .and_then(|agent| agent.process.as_ref())
            .ok_or(RuntimeError::NotRunning)?;
        let mut line = inbox_line(message);
        line.push('\n');
        process
            .stdin
            .send(line)
            .map_err(|_| RuntimeError::StdinClosed)
    }

    fn statuses(&self) -> Vec<AgentStatus> {
        self.inner
            .lock()
            .values()
            .filter(|agent| agent.status.phase != Phase::Deleted)
            .map(|agent| agent.status.clone())
            .collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<AgentStatus> {
        self.inner.feed.subscribe()
    }
}

fn status(
    agent_id: Uuid,
    phase: Phase,
    exit_code: Option<i32>,
    detail: Option<String>,
) -> AgentStatus {
    AgentStatus {
        agent_id,
        phase,
        seq: next_seq(),
        exit_code,
        detail,
    }
}

/// The value of a successful dispatch.
fn outcome(phase: Phase, pid: Option<u32>) -> Value {
    json!({ "phase": phase, "pid": pid })
}

/// Writes stdin lines in order. A slow reader only backs up this task, never
/// the broker; the pipe closes when the sender is dropped or the agent exits.
async fn pump_stdin(mut stdin: ChildStdin, mut lines: mpsc::UnboundedReceiver<String>) {
    while let Some(line) = lines.recv().await {
        if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
}

async fn watch_exit(
    runtime: ProcessRuntime,
    agent_id: Uuid,
    generation: u64,
    mut child: Child,
    exited: watch::Sender<Option<ExitStatus>>,
) {
    let exit = child.wait().await;
    // Publish first: a stopper waits on this.
    exited.send_replace(exit.as_ref().ok().copied());
    runtime.exited(agent_id, generation, exit).await;
}

/// SIGTERM to the process group, SIGKILL after `grace`; returns once the
/// group leader is gone (or after a last bounded wait).
async fn terminate(pid: u32, mut exited: watch::Receiver<Option<ExitStatus>>, grace: Duration) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if exited.borrow().is_some() {
        return;
    }
    let group = Pid::from_raw(raw);
    if let Err(err) = killpg(group, Signal::SIGTERM) {
        tracing::debug!(pid, "SIGTERM: {err}");
    }
    if tokio::time::timeout(grace, gone(&mut exited)).await.is_ok() {
        return;
    }
    tracing::warn!(pid, ?grace, "agent ignored SIGTERM; sending SIGKILL");
    if let Err(err) = killpg(group, Signal::SIGKILL) {
        tracing::debug!(pid, "SIGKILL: {err}");
    }
    if tokio::time::timeout(KILL_WAIT, gone(&mut exited))
        .await
        .is_err()
    {
        tracing::error!(pid, "agent still there after SIGKILL");
    }
}

/// Resolves when the process has been reaped.
async fn gone(exited: &mut watch::Receiver<Option<ExitStatus>>) {
    // An error means the watcher task is gone, and with it the child.
    let _ = exited.wait_for(Option::is_some).await;
}

async fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = tokio::fs::read(path).await.ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(value) => Some(value),
        Err(err) => {
            tracing::warn!(path = %path.display(), "unreadable: {err}");
            None
        }
    }
}

/// Replaces a small file atomically (temp file, fsync, rename).
async fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = tokio::fs::File::create(&tmp).await?;
    file.write_all(bytes).await?;
    file.flush().await?;
    file.sync_all().await?;
    drop(file);
    tokio::fs::rename(&tmp, path).await
}
