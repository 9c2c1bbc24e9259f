//! `amb-serf info` and `amb-serf rtt` (`serf info`, `serf rtt`): the agent's statistics, and
//! the round-trip time between two nodes from their network coordinates.

use anyhow::{anyhow, Context as _};
use serf_agent::rpc::{Client, Coordinate, Stats};

use super::client::{go_json, ClientArgs};
use super::members::Format;

/// Flags of `amb-serf info`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Flags of `amb-serf rtt`.
#[derive(Debug, clap::Args)]
pub(crate) struct RttArgs {
    #[command(flatten)]
    client: ClientArgs,

    /// A node name, as `members` shows it.
    node: String,

    /// The other node [default: the agent's own].
    other: Option<String>,
}

/// `serf info`'s text: sections sorted, `\tkey = value` lines sorted, the whole trimmed.
pub(crate) fn render_text(stats: &Stats) -> String {
    let mut out = String::new();
    for (section, values) in stats {
        out.push_str(section);
        out.push_str(":\n");
        for (key, value) in values {
            out.push_str(&format!("\t{key} = {value}\n"));
        }
    }
    out.trim().to_owned()
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let stats = client.stats().await.context("Error querying agent")?;
    match args.format {
        Format::Text => println!("{}", render_text(&stats)),
        Format::Json => println!("{}", go_json(&stats)),
    }
    Ok(())
}

pub(crate) async fn rtt(args: RttArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let other = match args.other {
        Some(other) => other,
        None => {
            let stats = client.stats().await.context("Error querying agent")?;
            stats
                .get("agent")
                .and_then(|agent| agent.get("name"))
                .cloned()
                .unwrap_or_default()
        }
    };
    let (a, b) = (
        coordinate(&client, &args.node).await?,
        coordinate(&client, &other).await?,
    );
    let rtt = a.distance_to(&b).ok_or_else(|| {
        anyhow!(
            "the coordinates of {:?} and {other:?} have different dimensions",
            args.node
        )
    })?;
    println!(
        "Estimated {} <-> {other} rtt: {:.3} ms",
        args.node,
        rtt.as_secs_f64() * 1000.0
    );
    Ok(())
}

async fn coordinate(client: &Client, node: &str) -> anyhow::Result<Coordinate> {
    client
        .get_coordinate(node)
        .await
        .context("Error getting coordinates")?
        .ok_or_else(|| anyhow!("Could not find a coordinate for node {node:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_sections_of_sorted_pairs() {
        let stats = Stats::from([
            (
                "serf".to_owned(),
                [("members", "2"), ("failed", "0")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .into(),
            ),
            (
                "agent".to_owned(),
                [("name".to_owned(), "a".to_owned())].into(),
            ),
        ]);
        assert_eq!(
            render_text(&stats),
            "agent:\n\tname = a\nserf:\n\tfailed = 0\n\tmembers = 2"
        );
    }
}
