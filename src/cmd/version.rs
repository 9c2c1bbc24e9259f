//! `amb-serf version` (`serf version`): the version and the Serf protocol range spoken.

use serf::serf::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};

/// Flags of `amb-serf version` (none).
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

/// Go's two lines, with our name and version.
pub(crate) fn render() -> String {
    format!(
        "amb-serf v{}\nAgent Protocol: {PROTOCOL_VERSION_MAX} (Understands back to: {PROTOCOL_VERSION_MIN})",
        env!("CARGO_PKG_VERSION")
    )
}

pub(crate) fn run(_args: Args) -> anyhow::Result<()> {
    println!("{}", render());
    Ok(())
}
