//! `amb-serf join`, `leave` and `force-leave` (`serf join`, `serf leave`, `serf force-leave`):
//! the agent's membership, changed over RPC.

use anyhow::Context as _;

use super::client::ClientArgs;

/// Flags of `amb-serf join`.
#[derive(Debug, clap::Args)]
pub(crate) struct JoinArgs {
    #[command(flatten)]
    client: ClientArgs,

    /// Replay past user events to the joining agent.
    #[arg(long)]
    replay: bool,

    /// Address of an existing member (HOST[:PORT]; repeatable).
    #[arg(required = true, value_name = "ADDRESS")]
    addresses: Vec<String>,
}

/// Flags of `amb-serf leave`.
#[derive(Debug, clap::Args)]
pub(crate) struct LeaveArgs {
    #[command(flatten)]
    client: ClientArgs,
}

/// Flags of `amb-serf force-leave`.
#[derive(Debug, clap::Args)]
pub(crate) struct ForceLeaveArgs {
    #[command(flatten)]
    client: ClientArgs,

    /// Remove the member from the member list at once instead of marking it left.
    #[arg(long)]
    prune: bool,

    /// Node name of the member.
    node: String,
}

pub(crate) async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let contacted = client
        .join(&args.addresses, args.replay)
        .await
        .context("Error joining the cluster")?;
    println!("Successfully joined cluster by contacting {contacted} nodes.");
    Ok(())
}

pub(crate) async fn leave(args: LeaveArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    match client.leave().await {
        // The agent may close the connection as it shuts down, before or after its answer.
        Ok(()) | Err(serf_agent::rpc::Error::Closed { .. }) => {}
        Err(error) => return Err(error).context("Error leaving"),
    }
    println!("Graceful leave complete");
    Ok(())
}

pub(crate) async fn force_leave(args: ForceLeaveArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    client
        .force_leave(&args.node, args.prune)
        .await
        .context("Error force leaving")
}
