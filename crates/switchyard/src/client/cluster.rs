//! `switchyard cluster`: which hub replicas are alive and which brokers each
//! one holds, for checking failover and load spread.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::http::{Call, HubClient};
use super::table::{self, Table};
use super::{Connection, ExitCodeError, Output, print_json};

#[derive(Debug, clap::Args)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, Deserialize)]
struct Cluster {
    replicas: Vec<Replica>,
}

#[derive(Debug, Deserialize)]
struct Replica {
    #[serde(default)]
    instance_id: String,
    #[serde(default)]
    address: String,
    started_at: Option<String>,
    last_seen: Option<String>,
    #[serde(default)]
    brokers: Vec<String>,
}

pub(crate) async fn run(args: ClusterArgs) -> Result<(), ExitCodeError> {
    let hub = HubClient::new(&args.conn)?;
    let reply = hub.call(Call::get(&["cluster"])).await?;
    if args.out.json {
        print_json(&reply.json());
        return Ok(());
    }
    let cluster: Cluster = reply.decode()?;
    if cluster.replicas.is_empty() {
        eprintln!("no live replicas");
    } else {
        print!("{}", list(&cluster.replicas, Utc::now()));
    }
    Ok(())
}

fn list(replicas: &[Replica], now: DateTime<Utc>) -> String {
    let mut table = Table::new(&["INSTANCE", "ADDRESS", "STARTED", "LAST SEEN", "BROKERS"]);
    for r in replicas {
        table.row(vec![
            r.instance_id.clone(),
            table::or_none(Some(&r.address)),
            table::timestamp(r.started_at.as_deref()),
            table::age(r.last_seen.as_deref(), now),
            r.brokers.len().to_string(),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn replicas_show_freshness_and_broker_count() {
        let cluster: Cluster = serde_json::from_value(json!({"replicas": [{
            "instance_id": "r-1", "address": "http://10.0.0.1:7700",
            "started_at": "2026-03-21T08:00:00Z", "last_seen": "2026-03-21T09:59:55Z",
            "brokers": ["b-1", "b-2"]
        }]}))
        .expect("decodes");
        let now = "2026-03-21T10:00:00Z".parse().expect("valid");
        assert_eq!(
            list(&cluster.replicas, now),
            "INSTANCE   ADDRESS                STARTED               LAST SEEN   BROKERS\n\
             r-1        http://10.0.0.1:7700   2026-03-21 08:00:00   5s ago      2\n"
        );
    }
}
