//! `amb-serf event` (`serf event`): dispatches a user event through the agent.

use anyhow::Context as _;

use super::client::{parse_go_bool, ClientArgs};

/// Flags of `amb-serf event`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,

    /// Whether repeated events of this name within a short time may be coalesced to the last.
    #[arg(
        long,
        value_name = "true|false",
        action = clap::ArgAction::Set,
        default_value = "true",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    coalesce: bool,

    /// Event name.
    name: String,

    /// Event payload.
    payload: Option<String>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let payload = args.payload.unwrap_or_default();
    client
        .user_event(&args.name, payload.as_bytes(), args.coalesce)
        .await
        .context("Error sending event")?;
    println!(
        "Event '{}' dispatched! Coalescing enabled: {}",
        args.name, args.coalesce
    );
    Ok(())
}
