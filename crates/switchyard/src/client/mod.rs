//! Client subcommands: a thin, script-friendly front end to a hub's HTTP API.
//!
//! Every hub failure becomes an [`ExitCodeError`] so shell scripts can branch
//! on the exit code instead of parsing messages; the codes are part of the
//! public contract and documented in `docs/cli.md`.

mod agents;
mod brokers;
mod cluster;
mod dispatches;
mod http;
mod messages;
mod spinner;
mod table;

use std::fmt;

/// Exit codes the client commands promise to scripts (see `docs/cli.md`).
pub(crate) mod exit {
    /// Anything not covered below (bad request, unreadable file, ...).
    pub(crate) const OTHER: u8 = 1;
    /// Invalid command-line usage; clap uses the same code for its errors.
    pub(crate) const USAGE: u8 = 2;
    /// The hub answered 404.
    pub(crate) const NOT_FOUND: u8 = 3;
    /// The hub answered 401 or 403.
    pub(crate) const UNAUTHORIZED: u8 = 4;
    /// The hub answered 409 (conflict, or the op is invalid in this phase).
    pub(crate) const CONFLICT: u8 = 5;
    /// The hub gave up waiting for the broker's outcome (504).
    pub(crate) const TIMED_OUT: u8 = 6;
    /// The broker reported that the operation failed (502).
    pub(crate) const BROKER_FAILED: u8 = 7;
    /// The hub could not be reached, or failed with another 5xx.
    pub(crate) const HUB_UNAVAILABLE: u8 = 8;
}

/// A failure that carries the process exit code `main` should use, and a
/// one-line message for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExitCodeError {
    code: u8,
    message: String,
}

impl ExitCodeError {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The process exit code for this failure.
    pub(crate) fn code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for ExitCodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitCodeError {}

/// Where the hub is and how to authenticate; flattened into every client
/// subcommand so the options can be given after the subcommand name.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Connection {
    /// Base URL of any hub replica (all replicas answer identically).
    #[arg(
        long,
        value_name = "URL",
        env = "SWITCHYARD_HUB",
        default_value = "http://127.0.0.1:7700"
    )]
    pub(crate) hub: String,
    /// API token (for example the admin token printed by `switchyard serve`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SWITCHYARD_TOKEN",
        hide_env_values = true
    )]
    pub(crate) token: String,
}

/// Output selection shared by commands that print hub resources.
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct Output {
    /// Print the hub's JSON response instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ClientCommand {
    /// Register, list, inspect and remove brokers.
    Brokers {
        #[command(subcommand)]
        command: brokers::BrokersCommand,
    },
    /// Define agents on brokers and drive their lifecycle.
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Send durable messages to an agent.
    Send(messages::SendArgs),
    /// Inspect messages sent with `send`.
    Messages {
        #[command(subcommand)]
        command: messages::MessagesCommand,
    },
    /// Inspect dispatches: the operations queued for brokers.
    Dispatches {
        #[command(subcommand)]
        command: dispatches::DispatchesCommand,
    },
    /// Show the live hub replicas and the brokers each one holds.
    Cluster(cluster::ClusterArgs),
}

pub(crate) async fn run(command: ClientCommand) -> anyhow::Result<()> {
    let result = match command {
        ClientCommand::Brokers { command } => brokers::run(command).await,
        ClientCommand::Agents { command } => agents::run(command).await,
        ClientCommand::Send(args) => messages::send(args).await,
        ClientCommand::Messages { command } => messages::run(command).await,
        ClientCommand::Dispatches { command } => dispatches::run(command).await,
        ClientCommand::Cluster(args) => cluster::run(args).await,
    };
    Ok(result?)
}

/// Prints a JSON value the way `--json` promises: the hub's response, pretty.
fn print_json(value: &serde_json::Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(_) => println!("{value}"),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// Mirrors how `main.rs` flattens the client commands, so parsing is
    /// tested the way users hit it.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        let mut full = vec!["switchyard"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).map(|cli| cli.command)
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_options_follow_the_subcommand() {
        let command = parse(&[
            "brokers",
            "ls",
            "--hub",
            "http://hub:1",
            "--token",
            "t",
            "--json",
        ])
        .expect("parses");
        let ClientCommand::Brokers {
            command: brokers::BrokersCommand::Ls { conn, out },
        } = command
        else {
            panic!("wrong command: {command:?}");
        };
        assert_eq!(conn.hub, "http://hub:1");
        assert_eq!(conn.token, "t");
        assert!(out.json);
    }

    #[test]
    fn missing_token_is_a_usage_error() {
        // clap would take an exported token from the environment instead.
        if std::env::var_os("SWITCHYARD_TOKEN").is_some() {
            return;
        }
        let err = parse(&["cluster"]).expect_err("token required");
        assert_eq!(err.exit_code(), i32::from(exit::USAGE));
    }

    #[test]
    fn exit_code_error_displays_only_its_message() {
        let err = ExitCodeError::new(exit::NOT_FOUND, "agent \"x\" not found");
        assert_eq!(err.to_string(), "agent \"x\" not found");
        assert_eq!(err.code(), 3);
        let any: anyhow::Error = err.into();
        assert_eq!(
            any.downcast_ref::<ExitCodeError>().map(ExitCodeError::code),
            Some(3)
        );
    }
}
