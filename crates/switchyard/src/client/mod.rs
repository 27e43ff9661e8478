//! Client subcommands that talk to a hub's HTTP API.

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ClientCommand {}

pub(crate) async fn run(command: ClientCommand) -> anyhow::Result<()> {
    match command {}
}
