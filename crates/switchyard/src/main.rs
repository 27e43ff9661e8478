#![doc = include_str!("../README.md")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard_hub::{Hub, HubConfig, random_secret, token_digest};
use switchyard_store::Database;
use tracing_subscriber::EnvFilter;

mod bench;
mod broker_cmd;
mod client;

const DEFAULT_DATABASE_URL: &str = "sqlite://switchyard.db";

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Dispatch hub for fleets of runtime brokers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub replica (migrates the database first).
    Serve(ServeArgs),
    /// Database administration.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Run the reference broker daemon (agents as local processes).
    Broker(broker_cmd::BrokerArgs),
    /// Measure throughput and latency of an in-process hub cluster.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(Debug, clap::Args)]
struct DatabaseArg {
    /// `postgres://...` for multi-replica mode, `sqlite://PATH` for a single node.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide_env_values = true
    )]
    database_url: String,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Address recorded in the replica registry (default: http://LISTEN).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    database: DatabaseArg,
    /// Admin API token (at least 16 characters). Required with PostgreSQL;
    /// on SQLite one is generated at first start when unset.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    admin_token: Option<String>,
    /// A file whose first line is the admin token: unlike --admin-token, it
    /// does not show in the process list (`/proc/PID/cmdline`).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN_FILE", value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
    /// PostgreSQL only: a direct connection string for the command bus
    /// listener, when --database-url goes through a transaction-pooling
    /// PgBouncer (LISTEN needs a session of its own).
    #[arg(long, env = "SWITCHYARD_LISTENER_DATABASE_URL", hide_env_values = true)]
    listener_database_url: Option<String>,
    /// Seconds a message waits for delivery before it expires (1 to
    /// 2,592,000, 30 days). A message may ask for its own `ttl_secs`.
    #[arg(
        long,
        env = "SWITCHYARD_MESSAGE_TTL_SECS",
        default_value_t = 86_400,
        value_parser = clap::value_parser!(u64).range(1..=2_592_000)
    )]
    message_ttl_secs: u64,
    /// Seconds a dispatch waits for its broker before it fails (1 to
    /// 2,592,000).
    #[arg(
        long,
        env = "SWITCHYARD_INTENT_DEADLINE_SECS",
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(1..=2_592_000)
    )]
    intent_deadline_secs: u64,
    /// Seconds finished dispatches and messages, and with them their
    /// idempotency keys, are kept (60 to 31,536,000, a year).
    #[arg(
        long,
        env = "SWITCHYARD_RETENTION_SECS",
        default_value_t = 604_800,
        value_parser = clap::value_parser!(u64).range(60..=31_536_000)
    )]
    retention_secs: u64,
    /// Seconds the event log keeps events for `GET /v1/events` clients
    /// that resume with `Last-Event-ID` (60 to 31,536,000).
    #[arg(
        long,
        env = "SWITCHYARD_EVENT_RETENTION_SECS",
        default_value_t = 86_400,
        value_parser = clap::value_parser!(u64).range(60..=31_536_000)
    )]
    event_retention_secs: u64,
    /// Bytes the files sent with one message may add up to (1 to
    /// 1,073,741,824).
    #[arg(
        long,
        env = "SWITCHYARD_MAX_ATTACHMENT_BYTES",
        default_value_t = 64 << 20,
        value_parser = clap::value_parser!(u64).range(1..=1 << 30)
    )]
    max_attachment_bytes: u64,
    /// Files one message may carry (1 to 1,000).
    #[arg(
        long,
        env = "SWITCHYARD_MAX_ATTACHMENTS",
        default_value_t = 16,
        value_parser = clap::value_parser!(u64).range(1..=1000)
    )]
    max_attachments: u64,
    /// Seconds a polling broker has to acknowledge what a poll returned
    /// before it is sent again (1 to 3,600).
    #[arg(
        long,
        env = "SWITCHYARD_POLL_LEASE_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    poll_lease_secs: u64,
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Apply pending migrations and exit. Safe to run repeatedly.
    Migrate {
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Copy a single-node hub from its SQLite file into PostgreSQL (after
    /// migrating both). Safe to run again; refuses a target that holds
    /// another hub and a source a hub is running on.
    Copy(CopyArgs),
}

#[derive(Debug, clap::Args)]
struct CopyArgs {
    /// The SQLite file: `sqlite:///ABSOLUTE/PATH`, `sqlite://RELATIVE/PATH`,
    /// `file:PATH` or `file:///ABSOLUTE/PATH`. It must exist.
    #[arg(long, value_name = "URL")]
    from: String,
    /// The PostgreSQL database, `postgres://...`: empty, or holding this
    /// hub from an earlier copy.
    #[arg(long, value_name = "URL", env = "DATABASE_URL", hide_env_values = true)]
    to: String,
    /// Remove the SQLite file (with its -wal and -shm files) once the
    /// target holds every row of it.
    #[arg(long)]
    remove_source: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(exit) = err.downcast_ref::<client::ExitCodeError>() {
                eprintln!("error: {exit}");
                return ExitCode::from(exit.code());
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Broker(args) => broker_cmd::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Client(command) => client::run(command).await,
        Command::Db {
            command: DbCommand::Migrate { database },
        } => {
            let url = &database.database_url;
            let db = Database::connect(url).await?;
            db.migrate(url).await?;
            println!("database is at schema version {}", db.latest_version());
            Ok(())
        }
        Command::Db {
            command: DbCommand::Copy(args),
        } => copy(args).await,
    }
}

/// `switchyard db copy`: one line per step and per table on stdout.
async fn copy(args: CopyArgs) -> anyhow::Result<()> {
    use switchyard_store::{HubCopy, HubOutcome};
    let copy = HubCopy::open(&args.from, &args.to).await?;
    println!(
        "source {}: no hub running, schema current",
        copy.source_path().display()
    );
    let report = copy.run().await?;
    match &report.hub {
        HubOutcome::Same(hub) => println!("target holds hub {hub} already: copying what it lacks"),
        HubOutcome::Adopted {
            hub,
            previous,
            admin_tokens,
        } => {
            println!("target was empty: it takes hub id {hub} (it had {previous})");
            if *admin_tokens > 0 {
                println!(
                    "  its {admin_tokens} admin token(s), stored by a first serve, do not make it \
                     a hub: they are kept, beside the source's"
                );
            }
        }
    }
    for t in &report.tables {
        println!(
            "{}: {} source rows, {} copied now, {} already there{}",
            t.table,
            t.source,
            t.copied,
            t.already_there,
            match t.missing() {
                0 => String::new(),
                n => format!(", {n} MISSING"),
            }
        );
    }
    println!(
        "event_log_horizon: pruned through {}",
        report.pruned_through
    );
    if !report.complete() {
        anyhow::bail!(
            "the target lacks source rows after the copy (see MISSING above); the source is kept"
        );
    }
    match report.copied() {
        0 => println!("nothing new to copy: the target holds every source row"),
        n => println!("copied {n} rows: the target holds every source row"),
    }
    if args.remove_source {
        for path in copy.remove_source().await? {
            println!("removed {}", path.display());
        }
    }
    Ok(())
}

/// The largest secret file read: a secret is one short line, and a path
/// given by mistake (a log, a device) must not be read whole.
const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// Reads a secret from the first line of a file (a trailing newline is not
/// part of it), so that it never appears on a command line.
fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let cannot = || format!("cannot read the {what} file {}", path.display());
    let mut text = String::new();
    std::fs::File::open(path)
        .with_context(cannot)?
        .take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(cannot)?;
    if text.len() as u64 > MAX_SECRET_FILE_BYTES {
        anyhow::bail!(
            "the {what} file {} is larger than {MAX_SECRET_FILE_BYTES} bytes; it should hold one line",
            path.display()
        );
    }
    let secret = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r');
    if secret.is_empty() {
        anyhow::bail!("the {what} file {} is empty", path.display());
    }
    Ok(secret.to_owned())
}

async fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.admin_token_file {
        args.admin_token = Some(read_secret_file(path, "admin token")?);
    }
    let url = &args.database.database_url;
    let postgres = url.starts_with("postgres");
    match &args.admin_token {
        Some(token) if token.len() < 16 => {
            anyhow::bail!("--admin-token must be at least 16 characters")
        }
        None if postgres => anyhow::bail!(
            "--admin-token-file or --admin-token (or SWITCHYARD_ADMIN_TOKEN) is required with PostgreSQL: \
             every replica of the cluster must be given the same token"
        ),
        _ => {}
    }
    let database = switchyard_store::open_database(url).await?;
    let store = database.clone().into_store();
    match &args.admin_token {
        Some(token) => store.add_admin_token(&token_digest(token)).await?,
        None if !store.has_admin_tokens().await? => {
            let token = random_secret();
            store.add_admin_token(&token_digest(&token)).await?;
            println!("switchyard admin token (shown once, stored only as a digest): {token}");
            println!("  use it with: export SWITCHYARD_TOKEN={token}");
        }
        None => tracing::info!("using the admin token generated at first start"),
    }
    let config = HubConfig {
        listen: args.listen,
        advertise: args.advertise,
        listener_database_url: args.listener_database_url,
        message_ttl: Duration::from_secs(args.message_ttl_secs),
        intent_deadline: Duration::from_secs(args.intent_deadline_secs),
        retention: Duration::from_secs(args.retention_secs),
        event_retention: Duration::from_secs(args.event_retention_secs),
        max_attachment_bytes: args.max_attachment_bytes,
        max_attachments: usize::try_from(args.max_attachments).unwrap_or(usize::MAX),
        poll_lease: Duration::from_secs(args.poll_lease_secs),
        ..HubConfig::default()
    };
    let hub = Hub::start(config, database).await?;
    // Scripts and tests wait for this line; with `--listen 127.0.0.1:0` it
    // is the only way to learn the port.
    println!("switchyard listening on http://{}", hub.addr());
    let stop = hub.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    hub.stopped().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("install SIGTERM handler")
            {
                Ok(term) => term,
                Err(err) => {
                    tracing::warn!("{err:#}");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn serve_defaults_are_the_hubs_defaults_and_out_of_range_is_refused() {
        let cli = Cli::try_parse_from(["switchyard", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve parses as serve");
        };
        let defaults = HubConfig::default();
        assert_eq!(
            Duration::from_secs(args.message_ttl_secs),
            defaults.message_ttl
        );
        assert_eq!(
            Duration::from_secs(args.intent_deadline_secs),
            defaults.intent_deadline
        );
        assert_eq!(Duration::from_secs(args.retention_secs), defaults.retention);
        assert_eq!(
            Duration::from_secs(args.event_retention_secs),
            defaults.event_retention
        );
        assert_eq!(args.max_attachment_bytes, defaults.max_attachment_bytes);
        assert_eq!(args.max_attachments as usize, defaults.max_attachments);
        assert_eq!(
            Duration::from_secs(args.poll_lease_secs),
            defaults.poll_lease
        );
        for bad in [
            ["--message-ttl-secs", "0"],
            ["--intent-deadline-secs", "2592001"],
            ["--retention-secs", "59"],
            ["--event-retention-secs", "59"],
            ["--max-attachment-bytes", "0"],
            ["--max-attachments", "1001"],
            ["--poll-lease-secs", "0"],
        ] {
            let argv = ["switchyard", "serve", bad[0], bad[1]];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_secret_file_is_one_bounded_line() {
        let dir = std::env::temp_dir().join(format!("sy-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret\r\nignored\n").unwrap();
        assert_eq!(read_secret_file(&file, "broker secret").unwrap(), "s3cret");
        std::fs::write(&file, "x".repeat(MAX_SECRET_FILE_BYTES as usize + 1)).unwrap();
        let err = read_secret_file(&file, "broker secret").unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_secret_file(&file, "broker secret").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
