//! `switchyard brokers ...`: register, list, inspect and remove brokers.

use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::http::{Call, HubClient};
use super::table::{self, Table};
use super::{Connection, ExitCodeError, Output, print_json};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BrokersCommand {
    /// Register a broker and print its credentials (the secret is shown once).
    Add {
        /// Unique broker name.
        name: String,
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        out: Output,
    },
    /// List brokers with their connection status.
    Ls {
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        out: Output,
    },
    /// Show one broker.
    Show {
        /// Broker id or name.
        broker: String,
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        out: Output,
    },
    /// Deregister a broker (refused while agents are defined on it).
    Rm {
        /// Broker id or name.
        broker: String,
        #[command(flatten)]
        conn: Connection,
    },
}

/// A broker as the hub reports it. Only `id` is required, so an older or
/// newer hub with a slightly different shape still prints something useful,
/// while an answer that is not a broker at all is reported as such.
#[derive(Debug, Deserialize)]
pub(crate) struct Broker {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    status: String,
    connected_replica: Option<String>,
    session_id: Option<String>,
    connected_at: Option<String>,
    last_heartbeat: Option<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
}

/// The answer to `POST /v1/brokers`: the only time the secret is visible.
#[derive(Debug, Deserialize)]
struct Registered {
    id: String,
    #[serde(default)]
    name: String,
    secret: String,
}

pub(crate) async fn run(command: BrokersCommand) -> Result<(), ExitCodeError> {
    match command {
        BrokersCommand::Add { name, conn, out } => add(&name, &conn, out).await,
        BrokersCommand::Ls { conn, out } => {
            let hub = HubClient::new(&conn)?;
            let reply = hub.call(Call::get(&["brokers"])).await?;
            if out.json {
                print_json(&reply.json());
                return Ok(());
            }
            let brokers: Vec<Broker> = reply.decode()?;
            if brokers.is_empty() {
                eprintln!("no brokers registered");
            } else {
                print!("{}", list(&brokers, Utc::now()));
            }
            Ok(())
        }
        BrokersCommand::Show { broker, conn, out } => {
            let hub = HubClient::new(&conn)?;
            let reply = hub.call(get(&broker)).await?;
            if out.json {
                print_json(&reply.json());
            } else {
                print!("{}", show(&reply.decode()?, Utc::now()));
            }
            Ok(())
        }
        BrokersCommand::Rm { broker, conn } => {
            let hub = HubClient::new(&conn)?;
            hub.call(Call::delete(&["brokers", &broker]).about(subject(&broker)))
                .await?;
            println!("removed broker {broker:?}");
            Ok(())
        }
    }
}

async fn add(name: &str, conn: &Connection, out: Output) -> Result<(), ExitCodeError> {
    let hub = HubClient::new(conn)?;
    let reply = hub
        .call(Call::post(&["brokers"], json!({ "name": name })))
        .await?;
    if out.json {
        print_json(&reply.json());
    } else {
        print!("{}", registered(&reply.decode()?, &conn.hub));
    }
    eprintln!("warning: the broker secret is shown only once; store it now");
    Ok(())
}

/// `GET /v1/brokers/{broker}` with a "not found" message naming it.
pub(crate) fn get(broker: &str) -> Call {
    Call::get(&["brokers", broker]).about(subject(broker))
}

fn subject(broker: &str) -> String {
    format!("broker {broker:?}")
}

/// The broker's id: `broker` itself when it already is one, otherwise looked
/// up by name. Filters such as `?broker_id=` are defined on ids only.
pub(crate) async fn resolve_id(hub: &HubClient, broker: &str) -> Result<String, ExitCodeError> {
    if uuid::Uuid::parse_str(broker).is_ok() {
        return Ok(broker.to_owned());
    }
    let found: Broker = hub.call(get(broker)).await?.decode()?;
    Ok(found.id)
}

fn registered(reg: &Registered, hub_url: &str) -> String {
    let name = if reg.name.is_empty() {
        String::new()
    } else {
        format!(" {:?}", reg.name)
    };
    // The secret goes into a file only its owner reads (printf is a shell
    // builtin, so it never shows in the process list), and the daemon reads
    // it from there instead of from its command line.
    let file = if reg.name.is_empty() {
        format!("{}.secret", reg.id)
    } else {
        format!("{}.secret", reg.name)
    };
    format!(
        "registered broker{name}\n\
         {}\
         \n\
         start the broker daemon with:\n  \
         (umask 077; printf '%s\\n' '{secret}' > {file})\n  \
         switchyard broker --hub {hub_url} --broker-id {id} --secret-file {file}\n",
        table::details(&[("id", reg.id.clone()), ("secret", reg.secret.clone())]),
        id = reg.id,
        secret = reg.secret,
    )
}

fn list(brokers: &[Broker], now: chrono::DateTime<Utc>) -> String {
    let mut table = Table::new(&["ID", "NAME", "STATUS", "REPLICA", "LAST HEARTBEAT"]);
    for b in brokers {
        table.row(vec![
            b.id.clone(),
            b.name.clone(),
            table::or_none(Some(&b.status)),
            b.connected_replica
                .as_deref()
                .map_or_else(|| table::NONE.to_owned(), table::short_id),
            table::age(b.last_heartbeat.as_deref(), now),
        ]);
    }
    table.render()
}

fn show(b: &Broker, now: chrono::DateTime<Utc>) -> String {
    let heartbeat = match b.last_heartbeat.as_deref() {
        Some(raw) => format!(
            "{} ({})",
            table::timestamp(Some(raw)),
            table::age(Some(raw), now)
        ),
        None => table::NONE.to_owned(),
    };
    table::details(&[
        ("id", b.id.clone()),
        ("name", b.name.clone()),
        ("status", table::or_none(Some(&b.status))),
        ("replica", table::or_none(b.connected_replica.as_deref())),
        ("session", table::or_none(b.session_id.as_deref())),
        ("connected", table::timestamp(b.connected_at.as_deref())),
        ("last heartbeat", heartbeat),
        ("created", table::timestamp(b.created_at.as_deref())),
        ("updated", table::timestamp(b.updated_at.as_deref())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> chrono::DateTime<Utc> {
        "2026-03-21T10:00:00Z".parse().expect("valid")
    }

    fn online() -> Broker {
        serde_json::from_value(json!({
            "id": "0195b3c4-0000-7000-8000-000000000001",
            "name": "edge-1",
            "status": "online",
            "connected_replica": "01a217db-ff1c-70df-b0c7-151e8d59dae9",
            "session_id": "5a5a5a5a-0000-4000-8000-000000000000",
            "connected_at": "2026-03-21T09:00:00Z",
            "last_heartbeat": "2026-03-21T09:59:57.5Z",
            "created_at": "2026-03-20T08:00:00Z",
            "updated_at": "2026-03-21T09:00:00Z"
        }))
        .expect("decodes")
    }

    #[test]
    fn list_shows_status_replica_and_heartbeat_age() {
        let offline: Broker = serde_json::from_value(json!({
            "id": "0195b3c4-0000-7000-8000-000000000002",
            "name": "edge-2",
            "status": "offline",
            "connected_replica": null,
            "last_heartbeat": null
        }))
        .expect("decodes");
        assert_eq!(
            list(&[online(), offline], now()),
            "ID                                     NAME     STATUS    REPLICA        LAST HEARTBEAT\n\
             0195b3c4-0000-7000-8000-000000000001   edge-1   online    151e8d59dae9   2s ago\n\
             0195b3c4-0000-7000-8000-000000000002   edge-2   offline   -              -\n"
        );
    }

    #[test]
    fn show_lists_every_field() {
        let text = show(&online(), now());
        assert!(text.contains("status:          online\n"), "{text}");
        assert!(
            text.contains("last heartbeat:  2026-03-21 09:59:57 (2s ago)\n"),
            "{text}"
        );
        assert!(text.contains("connected:       2026-03-21 09:00:00\n"));
    }

    #[test]
    fn registration_prints_a_ready_to_paste_command() {
        let reg: Registered = serde_json::from_value(json!({
            "id": "b-1", "name": "edge-1", "secret": "s3cr3t", "status": "offline"
        }))
        .expect("decodes");
        assert_eq!(
            registered(&reg, "http://hub:7700"),
            "registered broker \"edge-1\"\n\
             id:      b-1\n\
             secret:  s3cr3t\n\
             \n\
             start the broker daemon with:\n  \
             (umask 077; printf '%s\\n' 's3cr3t' > edge-1.secret)\n  \
             switchyard broker --hub http://hub:7700 --broker-id b-1 --secret-file edge-1.secret\n"
        );
    }
}
