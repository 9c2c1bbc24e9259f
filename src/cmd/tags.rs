//! `amb-serf tags` (`serf tags`): sets and deletes tags of the agent's own member.

use std::collections::BTreeMap;

use anyhow::Context as _;

use super::client::ClientArgs;

/// Flags of `amb-serf tags` (at least one `--set` or `--delete`).
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,

    /// Create or change a tag (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_pair, group = "change")]
    set: Vec<(String, String)>,

    /// Remove a tag, if present (repeatable).
    #[arg(long = "delete", value_name = "KEY", group = "change")]
    delete: Vec<String>,
}

/// `KEY=VALUE` as Go's `UnmarshalTags` reads it (split at the first `=`).
fn parse_pair(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{value:?} is not KEY=VALUE")),
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let set: BTreeMap<String, String> = args.set.into_iter().collect();
    client
        .update_tags(&set, &args.delete)
        .await
        .context("Error setting tags")?;
    println!("Successfully updated agent tags");
    Ok(())
}
