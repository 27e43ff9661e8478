//! `switchyard agents ...`: define agents and drive their lifecycle.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::brokers::Broker;
use super::dispatches::Dispatch;
use super::http::{self, Call, HubClient, Reply};
use super::spinner::Spinner;
use super::table::{self, Table};
use super::{Connection, ExitCodeError, Output, exit, print_json};

/// How long to wait for the hub when the user gave no `--timeout`: longer
/// than any sensible server-side wait, so the hub's own 504 (with its
/// dispatch id) is what the user normally sees.
const DEFAULT_WAIT: Duration = Duration::from_secs(600);
/// Headroom over `--timeout` for the hub to answer after it gives up.
const WAIT_SLACK: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Subcommand)]
pub(crate) enum AgentsCommand {
    /// Define an agent on a broker: `agents create NAME --broker B -- CMD ARGS...`
    Create(CreateArgs),
    /// List agents.
    Ls {
        /// Only agents on this broker (id or name).
        #[arg(long, value_name = "BROKER")]
        broker: Option<String>,
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        out: Output,
    },
    /// Show one agent.
    Show {
        /// Agent id or name.
        agent: String,
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        out: Output,
    },
    /// Start an agent and wait for the broker's outcome.
    Start(LifecycleArgs),
    /// Stop an agent and wait for the broker's outcome.
    Stop(LifecycleArgs),
    /// Restart an agent and wait for the broker's outcome.
    Restart(LifecycleArgs),
    /// Stop an agent and remove it from its broker.
    Rm(RmArgs),
    /// Run a named operation of the agent's broker runtime and print its
    /// result (JSON): `agents op AGENT inspect`, `agents op AGENT exec
    /// --args '{"argv": ["ls"]}'`.
    Op(OpArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct OpArgs {
    /// Agent id or name.
    agent: String,
    /// Operation name (e.g. `inspect`, `exec`, `files.list`, `files.read`).
    name: String,
    /// The operation's arguments, a JSON object.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    args: String,
    /// Return as soon as the call is queued, printing its dispatch id.
    #[arg(long)]
    no_wait: bool,
    /// Seconds the hub waits for the answer (hub default if unset).
    #[arg(long, value_name = "SECS", conflicts_with = "no_wait")]
    timeout: Option<u64>,
    /// Idempotency key: a retry with the same key and arguments is
    /// answered from the first call.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// Unique agent name.
    name: String,
    /// Broker to run the agent on (id or name).
    #[arg(long, value_name = "BROKER")]
    broker: String,
    /// Environment variable for the process; repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Label for broadcasts (`send --selector`); repeatable.
    #[arg(long = "label", value_name = "K=V", value_parser = parse_env)]
    labels: Vec<(String, String)>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
    #[command(flatten)]
    conn: Connection,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, clap::Args)]
pub(crate) struct LifecycleArgs {
    /// Agent id or name.
    agent: String,
    /// Return as soon as the operation is queued, printing its dispatch id.
    #[arg(long)]
    no_wait: bool,
    /// Seconds the hub waits for the broker's outcome (hub default if unset).
    #[arg(long, value_name = "SECS", conflicts_with = "no_wait")]
    timeout: Option<u64>,
    #[command(flatten)]
    conn: Connection,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RmArgs {
    /// Agent id or name.
    agent: String,
    /// Return as soon as the removal is queued, printing its dispatch id.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    conn: Connection,
    #[command(flatten)]
    out: Output,
}

/// An agent as the hub reports it; only `id` is required, for tolerance of
/// other hub versions.
#[derive(Debug, Deserialize)]
pub(crate) struct Agent {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    broker_id: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    phase: String,
    status_seq: Option<i64>,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    detail: Option<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
}

/// The lifecycle operations, with the words used to talk about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Start,
    Stop,
    Restart,
    Delete,
}

impl Op {
    /// The name used in the URL and in dispatches.
    fn name(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Restart => "restart",
            Op::Delete => "delete",
        }
    }

    fn progressive(self) -> &'static str {
        match self {
            Op::Start => "starting",
            Op::Stop => "stopping",
            Op::Restart => "restarting",
            Op::Delete => "removing",
        }
    }

    fn past(self) -> &'static str {
        match self {
            Op::Start => "started",
            Op::Stop => "stopped",
            Op::Restart => "restarted",
            Op::Delete => "removed",
        }
    }
}

/// What a lifecycle call answered: the outcome, or only the queued dispatch.
#[derive(Debug)]
enum Outcome {
    /// The broker reported the outcome; what is known of it.
    Done {
        phase: Option<String>,
        dispatch_id: Option<String>,
    },
    Queued {
        dispatch_id: String,
    },
}

pub(crate) async fn run(command: AgentsCommand) -> Result<(), ExitCodeError> {
    match command {
        AgentsCommand::Create(args) => create(args).await,
        AgentsCommand::Ls { broker, conn, out } => ls(broker.as_deref(), &conn, out).await,
        AgentsCommand::Show { agent, conn, out } => {
            let hub = HubClient::new(&conn)?;
            let reply = hub
                .call(Call::get(&["agents", &agent]).about(subject(&agent)))
                .await?;
            if out.json {
                print_json(&reply.json());
            } else {
                print!("{}", show(&reply.decode()?));
            }
            Ok(())
        }
        AgentsCommand::Op(args) => operation(args).await,
        AgentsCommand::Start(args) => lifecycle(Op::Start, args).await,
        AgentsCommand::Stop(args) => lifecycle(Op::Stop, args).await,
        AgentsCommand::Restart(args) => lifecycle(Op::Restart, args).await,
        AgentsCommand::Rm(args) => {
            let call = Call::delete(&["agents", &args.agent]);
            let lifecycle = LifecycleArgs {
                agent: args.agent,
                no_wait: args.no_wait,
                timeout: None,
                conn: args.conn,
                out: args.out,
            };
            perform(Op::Delete, call, lifecycle).await
        }
    }
}

fn subject(agent: &str) -> String {
    format!("agent {agent:?}")
}

fn parse_env(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected K=V, got {raw:?}")),
    }
}

async fn create(args: CreateArgs) -> Result<(), ExitCodeError> {
    let hub = HubClient::new(&args.conn)?;
    let env: BTreeMap<String, String> = args.env.into_iter().collect();
    let labels: BTreeMap<String, String> = args.labels.into_iter().collect();
    let body = json!({
        "name": args.name,
        "broker_id": args.broker,
        "command": args.command,
        "env": env,
        "labels": labels,
    });
    let reply = hub.call(Call::post(&["agents"], body)).await?;
    if args.out.json {
        print_json(&reply.json());
    } else {
        print!("{}", show(&reply.decode()?));
    }
    Ok(())
}

async fn ls(broker: Option<&str>, conn: &Connection, out: Output) -> Result<(), ExitCodeError> {
    let hub = HubClient::new(conn)?;
    let mut call = Call::get(&["agents"]);
    if let Some(broker) = broker {
        let id = super::brokers::resolve_id(&hub, broker).await?;
        call = call.query("broker_id", id);
    }
    let reply = hub.call(call).await?;
    if out.json {
        print_json(&reply.json());
        return Ok(());
    }
    let agents: Vec<Agent> = reply.decode()?;
    if agents.is_empty() {
        eprintln!("no agents");
        return Ok(());
    }
    // Names read better than ids; the table still works if this fails.
    let names = match hub.call(Call::get(&["brokers"])).await {
        Ok(reply) => http::decode::<Vec<Broker>>(&reply.json())
            .map(|brokers| brokers.into_iter().map(|b| (b.id, b.name)).collect())
            .unwrap_or_default(),
        Err(_) => HashMap::new(),
    };
    print!("{}", list(&agents, &names));
    Ok(())
}

/// `agents op`: prints the operation's result, or the dispatch id with
/// `--no-wait`.
async fn operation(args: OpArgs) -> Result<(), ExitCodeError> {
    let operation_args: serde_json::Value = serde_json::from_str(&args.args).map_err(|err| {
        ExitCodeError::new(exit::USAGE, format!("--args is not valid JSON: {err}"))
    })?;
    let hub = HubClient::new(&args.conn)?;
    let call = Call::post(
        &["agents", &args.agent, "ops", &args.name],
        json!({ "args": operation_args }),
    )
    .about(subject(&args.agent))
    .idempotency_key(args.idempotency_key);
    let call = waiting(call, args.no_wait, args.timeout);
    let answer = hub.call(call).await?.json();
    if args.no_wait {
        println!("{}", answer["dispatch_id"].as_str().unwrap_or("?"));
    } else {
        print_json(&answer["result"]);
    }
    Ok(())
}

/// A call that waits for the broker: `?wait=false` with `--no-wait`, else
/// `?timeout_secs=` when given, and a client timeout a little longer than
/// the hub's wait, so the hub's own 504 (naming the dispatch) arrives.
fn waiting(call: Call, no_wait: bool, timeout: Option<u64>) -> Call {
    if no_wait {
        return call.query("wait", "false");
    }
    match timeout {
        Some(secs) => call
            .query("timeout_secs", secs.to_string())
            .timeout(Duration::from_secs(secs) + WAIT_SLACK),
        None => call.timeout(DEFAULT_WAIT),
    }
}

async fn lifecycle(op: Op, args: LifecycleArgs) -> Result<(), ExitCodeError> {
    let call = Call::post(&["agents", &args.agent, op.name()], json!({}));
    perform(op, call, args).await
}

/// Sends a lifecycle call (already addressed) with the waiting options, and
/// reports the outcome.
async fn perform(op: Op, call: Call, args: LifecycleArgs) -> Result<(), ExitCodeError> {
    let hub = HubClient::new(&args.conn)?;
    let call = waiting(call.about(subject(&args.agent)), args.no_wait, args.timeout);
    let reply = {
        let _spinner = (!args.no_wait)
            .then(|| Spinner::start(format!("{} agent {:?}", op.progressive(), args.agent)));
        hub.call(call).await?
    };
    if args.out.json {
        print_json(&reply.json());
        return Ok(());
    }
    println!("{}", describe(op, &args.agent, &parse_outcome(&reply)?));
    Ok(())
}

/// Interprets a lifecycle answer. Accepts both `{agent, dispatch}` and a bare
/// agent (the older documented shape), and 204 for removals.
fn parse_outcome(reply: &Reply) -> Result<Outcome, ExitCodeError> {
    let Some(body) = &reply.body else {
        return Ok(Outcome::Done {
            phase: None,
            dispatch_id: None,
        });
    };
    if let Some(id) = body.get("dispatch_id").and_then(Value::as_str)
        && body.get("agent").is_none()
    {
        return Ok(Outcome::Queued {
            dispatch_id: id.to_owned(),
        });
    }
    if body.get("agent").is_some() {
        #[derive(Deserialize)]
        struct Wrapped {
            agent: Agent,
            #[serde(default)]
            dispatch: Option<Dispatch>,
        }
        let wrapped: Wrapped = http::decode(body)?;
        return Ok(Outcome::Done {
            phase: Some(wrapped.agent.phase),
            dispatch_id: wrapped.dispatch.map(|d| d.id),
        });
    }
    if body.get("id").is_some() {
        let agent: Agent = http::decode(body)?;
        return Ok(Outcome::Done {
            phase: Some(agent.phase),
            dispatch_id: None,
        });
    }
    Err(ExitCodeError::new(
        exit::OTHER,
        format!("unexpected response from the hub: {body}"),
    ))
}

fn describe(op: Op, agent: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Queued { dispatch_id } => {
            format!(
                "queued {} of agent {agent:?} as dispatch {dispatch_id}",
                op.name()
            )
        }
        Outcome::Done { phase, dispatch_id } => {
            let mut line = format!("{} agent {agent:?}", op.past());
            if let Some(phase) = phase.as_deref().filter(|p| !p.is_empty()) {
                line.push_str(&format!(": phase {phase}"));
            }
            if let Some(id) = dispatch_id.as_deref().filter(|d| !d.is_empty()) {
                line.push_str(&format!(" (dispatch {id})"));
            }
            line
        }
    }
}

fn list(agents: &[Agent], broker_names: &HashMap<String, String>) -> String {
    let mut table = Table::new(&["ID", "NAME", "BROKER", "PHASE", "UPDATED"]);
    for a in agents {
        let broker = broker_names
            .get(&a.broker_id)
            .cloned()
            .unwrap_or_else(|| table::short_id(&a.broker_id));
        table.row(vec![
            a.id.clone(),
            a.name.clone(),
            table::or_none(Some(&broker)),
            table::or_none(Some(&a.phase)),
            table::timestamp(a.updated_at.as_deref()),
        ]);
    }
    table.render()
}

fn show(a: &Agent) -> String {
    let env = a
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("\n");
    table::details(&[
        ("id", a.id.clone()),
        ("name", a.name.clone()),
        ("broker", table::or_none(Some(&a.broker_id))),
        ("phase", table::or_none(Some(&a.phase))),
        (
            "status seq",
            a.status_seq
                .map_or_else(|| table::NONE.to_owned(), |n| n.to_string()),
        ),
        (
            "exit code",
            a.exit_code
                .map_or_else(|| table::NONE.to_owned(), |n| n.to_string()),
        ),
        ("detail", table::or_none(a.detail.as_deref())),
        ("command", table::shell_words(&a.command)),
        (
            "env",
            if env.is_empty() {
                table::NONE.to_owned()
            } else {
                env
            },
        ),
        ("created", table::timestamp(a.created_at.as_deref())),
        ("updated", table::timestamp(a.updated_at.as_deref())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_json() -> Value {
        json!({
            "id": "a-1", "name": "w1", "broker_id": "b-1",
            "command": ["sh", "-c", "cat >> out"], "env": {"B": "2", "A": "1"},
            "phase": "running", "status_seq": 4,
            "created_at": "2026-03-21T09:00:00Z", "updated_at": "2026-03-21T09:30:00.5Z"
        })
    }

    fn reply(body: Option<Value>) -> Reply {
        Reply { body }
    }

    #[test]
    fn env_pairs_need_a_key() {
        assert_eq!(parse_env("A=1=2"), Ok(("A".into(), "1=2".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=1").is_err());
        assert!(parse_env("A").is_err());
    }

    #[test]
    fn waited_outcome_reports_phase_and_dispatch() {
        let body = json!({"agent": agent_json(), "dispatch": {"id": "d-9", "state": "done"}});
        let outcome = parse_outcome(&reply(Some(body))).expect("decodes");
        assert_eq!(
            describe(Op::Start, "w1", &outcome),
            "started agent \"w1\": phase running (dispatch d-9)"
        );
    }

    #[test]
    fn bare_agent_and_empty_answers_are_accepted() {
        let outcome = parse_outcome(&reply(Some(agent_json()))).expect("decodes");
        assert_eq!(
            describe(Op::Stop, "w1", &outcome),
            "stopped agent \"w1\": phase running"
        );
        let outcome = parse_outcome(&reply(None)).expect("decodes");
        assert_eq!(describe(Op::Delete, "w1", &outcome), "removed agent \"w1\"");
    }

    #[test]
    fn no_wait_reports_the_dispatch_id() {
        let outcome = parse_outcome(&reply(Some(json!({"dispatch_id": "d-1"})))).expect("ok");
        assert_eq!(
            describe(Op::Restart, "w1", &outcome),
            "queued restart of agent \"w1\" as dispatch d-1"
        );
    }

    #[test]
    fn unknown_shapes_are_errors() {
        let err = parse_outcome(&reply(Some(json!({"what": 1})))).expect_err("unknown");
        assert_eq!(err.code(), exit::OTHER);
    }

    #[test]
    fn list_prefers_broker_names() {
        let agents: Vec<Agent> = serde_json::from_value(json!([agent_json(), {
            "id": "a-2", "name": "w2", "broker_id": "01a217dc-0ad2-7730-acfb-8f692ad4c82f", "phase": "created"
        }]))
        .expect("decodes");
        let names = HashMap::from([("b-1".to_owned(), "edge-1".to_owned())]);
        assert_eq!(
            list(&agents, &names),
            "ID    NAME   BROKER         PHASE     UPDATED\n\
             a-1   w1     edge-1         running   2026-03-21 09:30:00\n\
             a-2   w2     8f692ad4c82f   created   -\n"
        );
    }

    #[test]
    fn show_quotes_the_command_and_sorts_env() {
        let agent: Agent = serde_json::from_value(agent_json()).expect("decodes");
        let text = show(&agent);
        assert!(text.contains("command:     sh -c 'cat >> out'\n"), "{text}");
        assert!(
            text.contains("env:         A=1\n             B=2\n"),
            "{text}"
        );
        assert!(text.contains("status seq:  4\n"), "{text}");
    }
}
