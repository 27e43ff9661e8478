//! `switchyard broker`: the reference broker daemon, running agents as
//! local processes under `--workdir`.
//!
//! Shutdown: on Ctrl-C or SIGTERM the broker closes its control channel
//! (1000), finishes the work it has queued, then stops every running agent
//! (SIGTERM, SIGKILL after `--stop-grace-secs`) so that no orphan outlives
//! it. Their recorded phase stays `running`, so the next broker started on
//! the same workdir starts them again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchyard_broker::{BrokerConfig, ProcessConfig, ProcessRuntime, Transport};
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub(crate) struct BrokerArgs {
    /// Hub base URL; repeat to list several, tried in turn on failure.
    #[arg(
        long = "hub",
        env = "SWITCHYARD_HUB",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7700"
    )]
    hubs: Vec<String>,
    /// This broker's id (or name) as registered with the hub.
    #[arg(long, env = "SWITCHYARD_BROKER_ID")]
    broker_id: String,
    /// The secret shown once when the broker was registered.
    #[arg(
        long,
        env = "SWITCHYARD_BROKER_SECRET",
        hide_env_values = true,
        required_unless_present = "secret_file",
        conflicts_with = "secret_file"
    )]
    secret: Option<String>,
    /// A file whose first line is the secret (at most 4 KiB): unlike --secret,
    /// it does not show in the process list (`/proc/PID/cmdline`).
    #[arg(long, env = "SWITCHYARD_BROKER_SECRET_FILE", value_name = "PATH")]
    secret_file: Option<PathBuf>,
    /// Where agents live: `<workdir>/agents/<agent-id>/`.
    #[arg(
        long,
        env = "SWITCHYARD_WORKDIR",
        default_value = "./switchyard-broker"
    )]
    workdir: PathBuf,
    /// How to reach the hub: `ws` (one WebSocket), `poll` (short HTTP
    /// requests, for networks that do not keep a WebSocket open) or `auto`
    /// (the WebSocket, polling a hub whose upgrade is refused and trying
    /// the upgrade again every 5 minutes).
    #[arg(long, env = "SWITCHYARD_TRANSPORT", default_value = "ws", value_parser = parse_transport)]
    transport: Transport,
    /// Seconds a stopping agent gets between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 5)]
    stop_grace_secs: u64,
}

pub(crate) async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let secret = match (args.secret, &args.secret_file) {
        (Some(secret), _) => secret,
        (None, Some(path)) => crate::read_secret_file(path, "broker secret")?,
        (None, None) => anyhow::bail!("--secret-file or --secret is required"),
    };
    tokio::fs::create_dir_all(&args.workdir)
        .await
        .with_context(|| format!("cannot create the workdir {}", args.workdir.display()))?;
    let mut process = ProcessConfig::new(&args.workdir);
    process.stop_grace = Duration::from_secs(args.stop_grace_secs);
    let runtime = ProcessRuntime::new(process)
        .await
        .context("cannot load the agents of the workdir")?;

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });

    let config = BrokerConfig {
        hubs: args.hubs,
        broker: args.broker_id,
        secret,
        workdir: args.workdir,
        transport: args.transport,
    };
    let result = switchyard_broker::run(config, Arc::new(runtime.clone()), shutdown).await;
    runtime.shutdown().await;
    result.context("the broker cannot run with this configuration")
}

fn parse_transport(text: &str) -> Result<Transport, String> {
    text.parse()
}
