//! `switchyard broker`: the reference broker daemon.

#[derive(Debug, clap::Args)]
pub(crate) struct BrokerArgs {}

pub(crate) async fn run(_args: BrokerArgs) -> anyhow::Result<()> {
    anyhow::bail!("the broker daemon is being built")
}
