//! `switchyard dispatches ...`: inspect the operations queued for brokers,
//! e.g. to follow a `--no-wait` start or a timed-out one.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::agents::Agent;
use super::http::{self, Call, HubClient};
use super::table::{self, Table};
use super::{Connection, ExitCodeError, Output, print_json};

/// Error messages can be long; the list shows a hint, `show` the full text.
const ERROR_WIDTH: usize = 40;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum DispatchesCommand {
    /// List dispatches.
    Ls {
        /// Only dispatches for this broker (id or name).
        #[arg(long, value_name = "BROKER")]
        broker: Option<String>,
        /// Only dispatches in this state.
        #[arg(long, value_name = "STATE", value_parser = ["pending", "in_progress", "done", "failed", "cancelled"])]
        state: Option<String>,
        /// At most this many dispatches.
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        out: Output,
    },
    /// Show one dispatch, including its arguments, result and error.
    Show {
        /// Dispatch id.
        id: String,
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        out: Output,
    },
    /// Withdraw a dispatch that has not been sent to its broker yet.
    Cancel {
        /// Dispatch id.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

/// A dispatch as the hub reports it; only `id` is required, for tolerance of
/// other hub versions.
#[derive(Debug, Deserialize)]
pub(crate) struct Dispatch {
    pub(crate) id: String,
    #[serde(default)]
    broker_id: String,
    agent_id: Option<String>,
    seq: Option<i64>,
    #[serde(default)]
    op: String,
    #[serde(default)]
    args: Value,
    #[serde(default)]
    state: String,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Value,
    claimed_by: Option<String>,
    claimed_at: Option<String>,
    attempts: Option<i64>,
    deadline: Option<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
}

pub(crate) async fn run(command: DispatchesCommand) -> Result<(), ExitCodeError> {
    match command {
        DispatchesCommand::Ls {
            broker,
            state,
            limit,
            conn,
            out,
        } => {
            let hub = HubClient::new(&conn)?;
            let mut call = Call::get(&["dispatches"]);
            if let Some(broker) = broker {
                let id = super::brokers::resolve_id(&hub, &broker).await?;
                call = call.query("broker_id", id);
            }
            if let Some(state) = state {
                call = call.query("state", state);
            }
            if let Some(limit) = limit {
                call = call.query("limit", limit.to_string());
            }
            let reply = hub.call(call).await?;
            if out.json {
                print_json(&reply.json());
                return Ok(());
            }
            let dispatches: Vec<Dispatch> = reply.decode()?;
            if dispatches.is_empty() {
                eprintln!("no dispatches");
            } else {
                print!("{}", list(&dispatches, &agent_names(&hub).await));
            }
            Ok(())
        }
        DispatchesCommand::Show { id, conn, out } => {
            let hub = HubClient::new(&conn)?;
            let reply = hub
                .call(Call::get(&["dispatches", &id]).about(format!("dispatch {id:?}")))
                .await?;
            if out.json {
                print_json(&reply.json());
            } else {
                print!("{}", show(&reply.decode()?));
            }
            Ok(())
        }
        DispatchesCommand::Cancel { id, conn } => {
            let hub = HubClient::new(&conn)?;
            let reply = hub
                .call(
                    Call::post(&["dispatches", &id, "cancel"], serde_json::json!({}))
                        .about(format!("dispatch {id:?}")),
                )
                .await?;
            let dispatch = reply.json();
            println!(
                "{} {}",
                dispatch["id"].as_str().unwrap_or(&id),
                dispatch["state"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}

/// Agent names by id: names read better than ids, and the table still works
/// (with short ids) if they cannot be fetched.
async fn agent_names(hub: &HubClient) -> HashMap<String, String> {
    match hub.call(Call::get(&["agents"])).await {
        Ok(reply) => http::decode::<Vec<Agent>>(&reply.json())
            .map(|agents| agents.into_iter().map(|a| (a.id, a.name)).collect())
            .unwrap_or_default(),
        Err(_) => HashMap::new(),
    }
}

/// JSON `null` as `-`, strings without quotes, anything else as compact JSON.
fn json_cell(value: &Value) -> String {
    match value {
        Value::Null => table::NONE.to_owned(),
        Value::String(s) => table::or_none(Some(s)),
        other => other.to_string(),
    }
}

fn list(dispatches: &[Dispatch], agent_names: &HashMap<String, String>) -> String {
    let mut table = Table::new(&[
        "ID",
        "OP",
        "AGENT",
        "STATE",
        "ATTEMPTS",
        "CLAIMED BY",
        "UPDATED",
        "ERROR",
    ]);
    for d in dispatches {
        table.row(vec![
            d.id.clone(),
            table::or_none(Some(&d.op)),
            match d.agent_id.as_deref() {
                Some(id) => agent_names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| table::short_id(id)),
                None => table::NONE.to_owned(),
            },
            table::or_none(Some(&d.state)),
            d.attempts
                .map_or_else(|| table::NONE.to_owned(), |n| n.to_string()),
            d.claimed_by
                .as_deref()
                .map_or_else(|| table::NONE.to_owned(), table::short_id),
            table::timestamp(d.updated_at.as_deref()),
            table::truncate(&json_cell(&d.error), ERROR_WIDTH),
        ]);
    }
    table.render()
}

fn show(d: &Dispatch) -> String {
    let number = |n: Option<i64>| n.map_or_else(|| table::NONE.to_owned(), |n| n.to_string());
    table::details(&[
        ("id", d.id.clone()),
        ("op", table::or_none(Some(&d.op))),
        ("state", table::or_none(Some(&d.state))),
        ("broker", table::or_none(Some(&d.broker_id))),
        ("agent", table::or_none(d.agent_id.as_deref())),
        ("seq", number(d.seq)),
        ("attempts", number(d.attempts)),
        ("claimed by", table::or_none(d.claimed_by.as_deref())),
        ("claimed at", table::timestamp(d.claimed_at.as_deref())),
        ("deadline", table::timestamp(d.deadline.as_deref())),
        ("args", json_cell(&d.args)),
        ("result", json_cell(&d.result)),
        ("error", json_cell(&d.error)),
        ("created", table::timestamp(d.created_at.as_deref())),
        ("updated", table::timestamp(d.updated_at.as_deref())),
    ])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn failed() -> Dispatch {
        serde_json::from_value(json!({
            "id": "d-1", "broker_id": "b-1", "agent_id": "0195b3c4-aaaa", "seq": 7,
            "op": "start", "args": {"command": ["sh"]}, "state": "failed",
            "result": null, "error": "spawn failed: No such file or directory (os error 2) while starting",
            "claimed_by": "01a217db-ff1c-70df-b0c7-151e8d59dae9", "claimed_at": "2026-03-21T09:00:01Z",
            "attempts": 1, "deadline": null,
            "created_at": "2026-03-21T09:00:00Z", "updated_at": "2026-03-21T09:00:02Z"
        }))
        .expect("decodes")
    }

    #[test]
    fn list_names_agents_truncates_errors_and_shortens_ids() {
        let mut other = failed();
        other.id = "d-2".into();
        other.agent_id = Some("01a217dc-0ae3-7509-a9c5-673139bee2e1".into());
        let names = HashMap::from([("0195b3c4-aaaa".to_owned(), "w1".to_owned())]);
        assert_eq!(
            list(&[failed(), other], &names),
            "ID    OP      AGENT          STATE    ATTEMPTS   CLAIMED BY     UPDATED               ERROR\n\
             d-1   start   w1             failed   1          151e8d59dae9   2026-03-21 09:00:02   spawn failed: No such file or directo...\n\
             d-2   start   673139bee2e1   failed   1          151e8d59dae9   2026-03-21 09:00:02   spawn failed: No such file or directo...\n"
        );
    }

    #[test]
    fn answers_without_an_id_are_rejected() {
        assert!(crate::client::http::decode::<Dispatch>(&json!([])).is_err());
        assert!(crate::client::http::decode::<Dispatch>(&json!({"op": "start"})).is_err());
    }

    #[test]
    fn show_renders_json_fields_compactly() {
        let text = show(&failed());
        assert!(
            text.contains("args:        {\"command\":[\"sh\"]}\n"),
            "{text}"
        );
        assert!(text.contains("result:      -\n"), "{text}");
        assert!(text.contains("deadline:    -\n"), "{text}");
        assert!(text.contains("seq:         7\n"), "{text}");
    }
}
