//! `amb-serf query` (`serf query`): dispatches a query and prints acks and responses as they
//! arrive (text), or all of them at the end (`--format json`, Go's `{"Acks", "Responses"}`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use serf_agent::rpc::{Query, QueryReply};

use super::client::{go_json, ClientArgs};
use super::members::{parse_tag_filter, Format};
use super::Reported;

/// Flags of `amb-serf query`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientArgs,

    /// Only this node answers (repeatable).
    #[arg(long = "node", value_name = "NAME")]
    nodes: Vec<String>,

    /// Only nodes whose tag KEY matches REGEX answer (repeatable).
    #[arg(long = "tag", value_name = "KEY=REGEX", value_parser = parse_tag_filter)]
    tags: Vec<(String, String)>,

    /// How long to wait for responses (e.g. 15s); the agent's default when not given.
    #[arg(long, value_parser = crate::duration::parse)]
    timeout: Option<Duration>,

    /// Ask for no acknowledgements.
    #[arg(long)]
    no_ack: bool,

    /// Relay each response through this many extra nodes.
    #[arg(long, default_value_t = 0, value_name = "N")]
    relay_factor: u8,

    /// Output: acks and responses as they come (text), or one JSON document at the end.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,

    /// Query name.
    name: String,

    /// Query payload.
    payload: Option<String>,
}

/// `serf query -format json`'s document.
#[derive(serde::Serialize)]
struct JsonReplies {
    #[serde(rename = "Acks")]
    acks: Option<Vec<String>>,
    #[serde(rename = "Responses")]
    responses: BTreeMap<String, String>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let query = Query {
        name: args.name.clone(),
        payload: args.payload.clone().unwrap_or_default().into_bytes(),
        filter_nodes: args.nodes.clone(),
        filter_tags: args.tags.iter().cloned().collect(),
        request_ack: !args.no_ack,
        relay_factor: args.relay_factor,
        timeout: args.timeout.filter(|timeout| !timeout.is_zero()),
    };
    let mut replies = client.query(&query).await.context("Error sending query")?;
    let text = args.format == Format::Text;
    let mut out = std::io::stdout().lock();
    if text {
        writeln!(out, "Query '{}' dispatched", args.name)?;
    }
    let (mut acks, mut responses, mut n_responses) = (Vec::new(), BTreeMap::new(), 0usize);
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let reply = tokio::select! {
            reply = replies.recv() => reply,
            _ = interrupt.recv() => return Err(Reported.into()),
        };
        match reply.transpose().context("Error reading query replies")? {
            None => break,
            Some(QueryReply::Ack(from)) => {
                if text {
                    writeln!(out, "Ack from '{from}'")?;
                }
                acks.push(from);
            }
            Some(QueryReply::Response { from, payload }) => {
                if text {
                    let shown = payload.strip_suffix(b"\n").unwrap_or(&payload);
                    write!(out, "Response from '{from}': ")?;
                    out.write_all(shown)?;
                    writeln!(out)?;
                }
                n_responses += 1;
                responses.insert(from, String::from_utf8_lossy(&payload).into_owned());
            }
        }
        out.flush()?;
    }
    if text {
        if !args.no_ack {
            writeln!(out, "Total Acks: {}", acks.len())?;
        }
        writeln!(out, "Total Responses: {n_responses}")?;
    } else {
        let document = JsonReplies {
            acks: (!acks.is_empty()).then_some(acks),
            responses,
        };
        writeln!(out, "{}", go_json(&document))?;
    }
    Ok(())
}
