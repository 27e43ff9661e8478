//! `switchyard send` and `switchyard messages ...`: durable messages to agents.

use std::io::BufRead;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::http::{Call, HubClient};
use super::table;
use super::{Connection, ExitCodeError, Output, exit, print_json};

#[derive(Debug, clap::Args)]
pub(crate) struct SendArgs {
    /// Agent id or name (with `--broker` or `--selector`, the message).
    agent: String,
    /// The message; sent as a JSON string unless `--json` is given.
    #[arg(conflicts_with = "file")]
    text: Option<String>,
    /// Broadcast to every live agent of this broker (id or name), in one
    /// all-or-none write; the first argument is then the message.
    #[arg(long, value_name = "BROKER", conflicts_with_all = ["selector", "file"])]
    broker: Option<String>,
    /// Broadcast to every live agent whose labels contain all of these
    /// `key=value` pairs (comma-separated); the first argument is then the
    /// message.
    #[arg(long, value_name = "K=V,...", conflicts_with = "file")]
    selector: Option<String>,
    /// Send each non-empty line of FILE as one message, in order (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Parse TEXT (or each line of FILE) as JSON instead of sending a string.
    #[arg(long)]
    json: bool,
    /// Idempotency key; with `--file`, line N uses `KEY-N`.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum MessagesCommand {
    /// Show one message and its delivery state.
    Show {
        /// Message id (printed by `send`).
        id: String,
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        out: Output,
    },
    /// Withdraw a message that has not been sent yet.
    Cancel {
        /// Message id (printed by `send`).
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

/// The answer to a send: the message id and its state (normally `pending`).
#[derive(Debug, Deserialize)]
struct Accepted {
    id: String,
    #[serde(default)]
    state: String,
}

#[derive(Debug, Deserialize)]
struct Message {
    id: String,
    #[serde(default)]
    agent_id: String,
    #[serde(default)]
    broker_id: String,
    seq: Option<i64>,
    #[serde(default)]
    body: Value,
    #[serde(default)]
    state: String,
    attempts: Option<i64>,
    created_at: Option<String>,
    delivered_at: Option<String>,
    expires_at: Option<String>,
}

pub(crate) async fn run(command: MessagesCommand) -> Result<(), ExitCodeError> {
    match command {
        MessagesCommand::Show { id, conn, out } => {
            let hub = HubClient::new(&conn)?;
            let reply = hub
                .call(Call::get(&["messages", &id]).about(format!("message {id:?}")))
                .await?;
            if out.json {
                print_json(&reply.json());
            } else {
                print!("{}", show(&reply.decode()?));
            }
            Ok(())
        }
        MessagesCommand::Cancel { id, conn } => {
            let hub = HubClient::new(&conn)?;
            let reply = hub
                .call(Call::delete(&["messages", &id]).about(format!("message {id:?}")))
                .await?;
            let message: Message = reply.decode()?;
            println!("{} {}", message.id, message.state);
            Ok(())
        }
    }
}

/// Sends TEXT, or every line of `--file`, printing `ID STATE` per message;
/// with `--broker` or `--selector`, one broadcast, printing its id and
/// `ID AGENT STATE` per copy.
pub(crate) async fn send(args: SendArgs) -> Result<(), ExitCodeError> {
    let hub = HubClient::new(&args.conn)?;
    if args.broker.is_some() || args.selector.is_some() {
        return broadcast(&hub, &args).await;
    }
    match (&args.text, &args.file) {
        (Some(text), _) => {
            let body = message_body(text, args.json).map_err(|err| {
                ExitCodeError::new(exit::USAGE, format!("TEXT is not valid JSON: {err}"))
            })?;
            send_one(&hub, &args.agent, body, args.idempotency_key.clone()).await
        }
        (None, Some(file)) => send_lines(&hub, &args, file).await,
        (None, None) => Err(ExitCodeError::new(
            exit::USAGE,
            "give the message TEXT or --file FILE",
        )),
    }
}

async fn broadcast(hub: &HubClient, args: &SendArgs) -> Result<(), ExitCodeError> {
    if args.text.is_some() {
        return Err(ExitCodeError::new(
            exit::USAGE,
            "with --broker or --selector, give only the message",
        ));
    }
    let body = message_body(&args.agent, args.json).map_err(|err| {
        ExitCodeError::new(exit::USAGE, format!("the message is not valid JSON: {err}"))
    })?;
    let to = match (&args.broker, &args.selector) {
        (Some(broker), _) => json!({ "broker": broker }),
        (None, Some(selector)) => json!({ "labels": parse_selector(selector)? }),
        (None, None) => {
            return Err(ExitCodeError::new(
                exit::USAGE,
                "give --broker or --selector",
            ));
        }
    };
    let reply = hub
        .call(
            Call::post(&["messages"], json!({ "to": to, "body": body }))
                .idempotency_key(args.idempotency_key.clone()),
        )
        .await?;
    let answer = reply.json();
    let copies = answer["messages"].as_array().cloned().unwrap_or_default();
    println!(
        "broadcast {} to {} agent(s)",
        answer["broadcast_id"].as_str().unwrap_or("?"),
        copies.len()
    );
    for copy in copies {
        println!(
            "{} {} {}",
            copy["id"].as_str().unwrap_or("?"),
            copy["agent_id"].as_str().unwrap_or("?"),
            copy["state"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// `k=v,k2=v2` as a JSON object; the hub checks the words.
fn parse_selector(selector: &str) -> Result<serde_json::Map<String, Value>, ExitCodeError> {
    let mut labels = serde_json::Map::new();
    for pair in selector.split(',').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(ExitCodeError::new(
                exit::USAGE,
                format!("--selector takes key=value pairs, not {pair:?}"),
            ));
        };
        labels.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    if labels.is_empty() {
        return Err(ExitCodeError::new(
            exit::USAGE,
            "--selector needs a key=value pair",
        ));
    }
    Ok(labels)
}

/// The `body` to send: the text itself as a JSON string, or the parsed JSON.
fn message_body(text: &str, as_json: bool) -> Result<Value, serde_json::Error> {
    if as_json {
        serde_json::from_str(text)
    } else {
        Ok(Value::String(text.to_owned()))
    }
}

async fn send_one(
    hub: &HubClient,
    agent: &str,
    body: Value,
    key: Option<String>,
) -> Result<(), ExitCodeError> {
    let reply = hub
        .call(
            Call::post(&["agents", agent, "messages"], json!({ "body": body }))
                .about(format!("agent {agent:?}"))
                .idempotency_key(key),
        )
        .await?;
    let accepted: Accepted = reply.decode()?;
    println!("{} {}", accepted.id, table::or_none(Some(&accepted.state)));
    Ok(())
}

/// Most lines sent in one `POST /v1/messages`.
const LINES_PER_BATCH: usize = 500;

/// Streams lines so `tail -f log | switchyard send a --file -` works. Lines
/// that are already available go out together in one all-or-none batch
/// (`POST /v1/messages`, at most 500); a batch is sent as soon as no more
/// lines are waiting, and each batch is accepted before the next is sent,
/// which keeps the messages in order. Lines are read on a plain thread: a
/// blocked stdin read must not hold up runtime shutdown when a send fails.
async fn send_lines(
    hub: &HubClient,
    args: &SendArgs,
    file: &std::path::Path,
) -> Result<(), ExitCodeError> {
    let opened = if file.as_os_str() == "-" {
        None
    } else {
        Some(std::fs::File::open(file).map_err(|err| {
            ExitCodeError::new(
                exit::OTHER,
                format!("cannot open {}: {err}", file.display()),
            )
        })?)
    };
    let name = if opened.is_none() {
        "stdin".to_owned()
    } else {
        file.display().to_string()
    };
    let (tx, mut rx) = mpsc::channel::<std::io::Result<String>>(LINES_PER_BATCH);
    std::thread::spawn(move || {
        let reader: Box<dyn BufRead> = match opened {
            Some(file) => Box::new(std::io::BufReader::new(file)),
            None => Box::new(std::io::stdin().lock()),
        };
        for line in reader.lines() {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut number = 0usize;
    let mut sent = 0usize;
    let mut batch: Vec<Value> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(line) = next.take() {
            number += 1;
            let line = line.map_err(|err| {
                ExitCodeError::new(
                    exit::OTHER,
                    format!("cannot read line {number} of {name}: {err} ({sent} sent)"),
                )
            })?;
            let text = line.strip_suffix('\r').unwrap_or(&line);
            if !text.trim().is_empty() {
                let body = message_body(text, args.json).map_err(|err| {
                    ExitCodeError::new(
                        exit::OTHER,
                        format!("line {number} of {name} is not valid JSON: {err} ({sent} sent)"),
                    )
                })?;
                let mut item = json!({ "agent": args.agent, "body": body });
                if let Some(key) = &args.idempotency_key {
                    item["idempotency_key"] = json!(line_key(key, number));
                }
                batch.push(item);
            }
            if batch.len() < LINES_PER_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            sent += send_batch(hub, &args.agent, std::mem::take(&mut batch)).await?;
        }
    }
    Ok(())
}

/// Sends one batch; prints `ID STATE` per message; returns how many.
async fn send_batch(
    hub: &HubClient,
    agent: &str,
    items: Vec<Value>,
) -> Result<usize, ExitCodeError> {
    let reply = hub
        .call(
            Call::post(&["messages"], json!({ "messages": items }))
                .about(format!("agent {agent:?}")),
        )
        .await?;
    #[derive(serde::Deserialize)]
    struct Batch {
        messages: Vec<Accepted>,
    }
    let accepted: Batch = reply.decode()?;
    for m in &accepted.messages {
        println!("{} {}", m.id, table::or_none(Some(&m.state)));
    }
    Ok(accepted.messages.len())
}

/// Per-line idempotency key: one key for all lines would make the hub keep
/// only the first, while `KEY-N` makes re-sending the same file safe.
fn line_key(key: &str, line: usize) -> String {
    format!("{key}-{line}")
}

fn show(m: &Message) -> String {
    let number = |n: Option<i64>| n.map_or_else(|| table::NONE.to_owned(), |n| n.to_string());
    table::details(&[
        ("id", m.id.clone()),
        ("agent", table::or_none(Some(&m.agent_id))),
        ("broker", table::or_none(Some(&m.broker_id))),
        ("seq", number(m.seq)),
        ("state", table::or_none(Some(&m.state))),
        ("attempts", number(m.attempts)),
        ("body", m.body.to_string()),
        ("created", table::timestamp(m.created_at.as_deref())),
        ("delivered", table::timestamp(m.delivered_at.as_deref())),
        ("expires", table::timestamp(m.expires_at.as_deref())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_a_json_string_unless_json_is_asked_for() {
        assert_eq!(
            message_body("{\"a\":1}", false).expect("string"),
            json!("{\"a\":1}")
        );
        assert_eq!(
            message_body("{\"a\":1}", true).expect("json"),
            json!({"a": 1})
        );
        assert!(message_body("not json", true).is_err());
    }

    #[test]
    fn each_line_gets_its_own_key() {
        assert_eq!(line_key("batch-7", 3), "batch-7-3");
    }

    #[test]
    fn show_prints_the_body_as_json() {
        let message: Message = serde_json::from_value(json!({
            "id": "m-1", "agent_id": "a-1", "broker_id": "b-1", "seq": 3,
            "body": {"text": "hi"}, "state": "delivered", "attempts": 1,
            "created_at": "2026-03-21T09:00:00Z", "delivered_at": "2026-03-21T09:00:01Z",
            "expires_at": null
        }))
        .expect("decodes");
        let text = show(&message);
        assert!(text.contains("body:       {\"text\":\"hi\"}\n"), "{text}");
        assert!(text.contains("state:      delivered\n"), "{text}");
        assert!(text.contains("expires:    -\n"), "{text}");
    }
}
